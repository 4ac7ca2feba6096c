"""Load a model and its tokenizer from a registry name, a local Hugging Face folder or a .gguf file."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rksc import validate
from rksc.errors import RkscError
from rksc.kernels.machine import probe
from rksc.models import pull, registry
from rksc.models.compute import choose

DTYPES = validate.DTYPES
GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    dtype: str  # activations and KV cache (float32, bfloat16, float16), or "remote"
    context_limit: int | None = None  # a server's smaller context (max_model_len), for remote backends
    compute: object = None  # rksc.models.compute.Compute: dtype, weight format and kernel, and why
    machine: object = None  # rksc.kernels.machine.Machine it was chosen for

    @property
    def max_context(self) -> int:
        cfg = self.model.config.get_text_config()
        context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        return min(context, self.context_limit or context)

    @functools.cached_property
    def max_question_chars(self) -> int:
        """More characters than this cannot fit the context even if every token were the longest in
        the vocabulary, so a longer question is refused before it is tokenised."""
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        return self.max_context * max(longest, 1)


def display_name(spec: str) -> str:
    """The name a model loads under (LoadedModel.name, "model" in every result), without loading it."""
    if spec in registry.MODELS:
        return spec
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else path.name


def resolve(spec: str) -> tuple[str, Path, str | None]:
    """Map --model to (display name, folder, gguf file name or None); prepares registry models.
    Everything that can be checked without loading is checked here, so a wrong path or a damaged
    file is a one-line user error rather than an exception from deep inside transformers."""
    validate.text("model", spec)
    path = Path(spec).expanduser()
    if spec in registry.MODELS:
        return spec, pull.ensure(spec), None
    try:
        return _resolve_path(spec, path)
    except OSError as e:
        raise RkscError(f"cannot read model {spec}: {e.strerror or e}") from None


def _resolve_path(spec: str, path: Path) -> tuple[str, Path, str | None]:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RkscError(f"model file not found: {spec}")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise RkscError(f"{spec} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return path.stem, path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RkscError(f"{spec} is a folder but holds no config.json (not a Hugging Face model folder)")
        problem = registry.structure_problem(path)
        if problem:
            raise RkscError(f"{spec} is not a usable model folder: {problem}")
        return path.name, path, None
    if os.sep in spec or spec.startswith("."):
        raise RkscError(f"model folder not found: {spec}")
    registry.recipe(spec)  # raises the unknown-model error with the list of known names
    raise AssertionError("unreachable")


def load(spec: str | None = None, dtype: str = "auto", threads: int | None = None,
         weights: str = "auto") -> LoadedModel:
    """Load a model for inference on CPU. `spec` defaults to the registry's default model; `dtype` and
    `weights` default to what runs fastest here without changing the prepared weights
    (rksc.models.compute)."""
    validate.dtype(dtype)
    validate.weights(weights)
    threads = validate.thread_count(threads)
    spec = registry.DEFAULT_MODEL if spec is None else spec
    validate.text("model", spec)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    here = probe()
    compute = choose(here, dtype, weights)  # before the slow load: an impossible choice is a user error
    if compute.kernel == "fbgemm":
        print(f"rksc: {compute.reasons[-1]}", file=sys.stderr)
    name, folder, gguf_file = resolve(spec)
    if gguf_file:
        print(f"loading {gguf_file} directly (dequantizing; a registry name loads faster)", file=sys.stderr)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        lm = _from_pretrained(name, folder, compute, kwargs)
    except RkscError:
        raise
    except Exception as e:  # damaged or unsupported files: whatever transformers raises, one line
        raise RkscError(_load_failure(spec, e)) from None
    lm.machine = here
    return lm


def _from_pretrained(name: str, folder: Path, compute, kwargs: dict) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rksc.models import layers, weights  # torch: only once a model loads (resolve stays light)

    stored = _stored_dtype(folder) if not kwargs else None
    # fp16 and int8 weights are packed from the checkpoint's own 16-bit values (loading them as float32
    # first only costs time); everything else is then cast to the compute dtype
    packed = compute.weights in ("fp16", "int8")
    load_dtype = stored if packed and stored in ("bfloat16", "float16") else compute.dtype
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, load_dtype), attn_implementation="sdpa", **kwargs)
    model.eval()
    try:
        weights.convert(model, compute.weights, compute.kernel)
    except ValueError as e:
        if not compute.auto or compute.dtype != "float32":
            raise RkscError(f"cannot hold {name}'s weights as {compute.weights}: {e}; use --weights fp32") from None
        compute = replace(compute, weights="fp32", kernel="mkl",
                          reasons=(*compute.reasons, f"weights fp32 after all: {name}'s weights have no exact "
                                                     f"{compute.weights} form ({e})"))
    if load_dtype != compute.dtype:
        model.to(getattr(torch, compute.dtype))
    if compute.kernel in ("rksc", "rksc-int8"):
        layers.install(model)  # Llama and Qwen2 layers with their small operations compiled
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return LoadedModel(name=name, path=folder, model=model, tokenizer=tokenizer, dtype=compute.dtype,
                       compute=compute)


def _stored_dtype(folder: Path) -> str | None:
    """The dtype a Hugging Face folder's config says its weights are stored in (None: not said)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


@dataclass
class Weightless:
    """A model's configs without its weights: what a remote backend's client needs."""

    config: object
    generation_config: object


def load_tokenizer(spec: str | None = None) -> LoadedModel:
    """The tokenizer and configs of a model, without its weights (a remote backend builds its
    prompts with them). `spec`: a registry name or a folder with the tokenizer and config.json."""
    spec = registry.DEFAULT_MODEL if spec is None else spec
    validate.text("model", spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec in registry.MODELS:
        name, folder, gguf_file = resolve(spec)
    else:
        path = Path(spec).expanduser()
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise RkscError(f"--model {spec}: give a registry name or a folder with the served model's tokenizer "
                            "and config.json (prompts are tokenised here and sent as token ids)")
        name, folder, gguf_file = path.name, path, None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        config = AutoConfig.from_pretrained(folder, **kwargs)
        try:
            generation = GenerationConfig.from_pretrained(folder, **kwargs)
        except OSError:  # no generation_config.json
            generation = GenerationConfig.from_model_config(config)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # damaged or unsupported files: whatever transformers raises, one line
        raise RkscError(_load_failure(spec, e)) from None
    return LoadedModel(name=name, path=folder, model=Weightless(config, generation), tokenizer=tokenizer,
                       dtype="remote")


def _load_failure(spec: str, error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    message = f"cannot load model {spec}: {first[:300]}"
    if spec in registry.MODELS:
        message += f"; if its files are damaged, repair them with: rksc models pull {spec} --force"
    return message
