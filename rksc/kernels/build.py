"""Compile rksc's C++ kernels once per machine and load them with ctypes.

A kernel source in this folder is compiled with the machine's C++ compiler (`$CXX`, else g++ or
c++) into `$RKSC_HOME/kernels/<name>-<hash>.so`, where the hash covers the source, the flags and the
compiler's version, so an edit or another compiler builds anew and a later run loads the file at
once. The build writes a temporary file and renames it, so processes that build at the same time
(Ray workers, test runs) never load half a file. OpenMP comes from the libgomp that torch has
already loaded (torch is imported first), so the kernels share torch's thread pool instead of
starting a second one that would compete for the cores.

Nothing here raises for a machine without a compiler: `load` returns a `Build` whose `error` says
in one line why the kernels are not there, and callers fall back to torch's kernels and say so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp before any kernel library needs one)

from rksc.paths import rksc_home

SOURCES = Path(__file__).resolve().parent
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
TIMEOUT_S = 300


@dataclass
class Build:
    name: str
    library: ctypes.CDLL | None = None
    path: Path | None = None
    compiler: str | None = None
    built: bool = False  # compiled by this process (False: loaded from the cache)
    error: str | None = None  # why there is no library


def compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def cache_dir() -> Path:
    return rksc_home() / "kernels"


@functools.cache
def load(name: str) -> Build:
    """The compiled library of `<name>.cpp`, built on first use; never raises."""
    source = SOURCES / f"{name}.cpp"
    cxx = compiler()
    if cxx is None:
        return Build(name, error="no C++ compiler found (set $CXX, or install g++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        text = source.read_bytes()
        digest = hashlib.sha256(text + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
        folder = cache_dir()
        path = folder / f"{name}-{digest}.so"
        built = False
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _compile(cxx, source, path)
            built = True
        return Build(name, ctypes.CDLL(str(path)), path, cxx, built)
    except _BuildFailed as e:
        return Build(name, compiler=cxx, error=str(e))
    except Exception as e:  # an unwritable cache, a library that does not load: one line, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Build(name, compiler=cxx, error=f"{type(e).__name__}: {first[:200]}")


class _BuildFailed(Exception):
    pass


def _compile(cxx: str, source: Path, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise _BuildFailed(f"{cxx} could not compile {source.name}: {(lines or ['no output'])[0][:200]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired:
        raise _BuildFailed(f"{cxx} took more than {TIMEOUT_S} s to compile {source.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
