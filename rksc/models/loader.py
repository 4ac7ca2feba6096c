"""Load a model and its tokenizer from a registry name, a local Hugging Face folder or a .gguf file."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rksc.errors import RkscError
from rksc.models import registry

DTYPES = ("bfloat16", "float32", "float16")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    dtype: str

    @property
    def max_context(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def resolve(spec: str) -> tuple[str, Path, str | None]:
    """Map --model to (display name, folder, gguf file name or None); prepares registry models."""
    path = Path(spec).expanduser()
    if spec in registry.MODELS:
        return spec, registry.prepare(spec), None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RkscError(f"model file not found: {spec}")
        return path.stem, path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RkscError(f"{spec} is a folder but holds no config.json (not a Hugging Face model folder)")
        return path.name, path, None
    if os.sep in spec or spec.startswith("."):
        raise RkscError(f"model folder not found: {spec}")
    registry.recipe(spec)  # raises the unknown-model error with the list of known names
    raise AssertionError("unreachable")


def load(spec: str | None = None, dtype: str = "bfloat16", threads: int | None = None) -> LoadedModel:
    """Load a model for inference on CPU. `spec` defaults to the registry's default model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if dtype not in DTYPES:
        raise RkscError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    name, folder, gguf_file = resolve(spec or registry.DEFAULT_MODEL)
    if gguf_file:
        print(f"loading {gguf_file} directly (dequantizing; a registry name loads faster)", file=sys.stderr)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), attn_implementation="sdpa", **kwargs)
    model.eval()
    if dtype == "bfloat16":
        from rksc.models.packed import pack_linears

        pack_linears(model)  # same products, weights read once per step instead of reordered per call
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return LoadedModel(name=name, path=folder, model=model, tokenizer=tokenizer, dtype=dtype)
