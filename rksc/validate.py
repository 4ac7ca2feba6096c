"""Generic checks for arguments from outside (types, ranges, names from a list, text, sizes,
memory, files): the CLI, SolveConfig, Solver, ServerConfig and BenchConfig all call these helpers,
so a mistake gets the same one-line RkscError whichever door it came in by.

The bottom layer: nothing here imports rksc beyond rksc.errors. Checks that know a domain live
with it and call these: early-exit policies and thresholds in rksc.reasoning.early, the block
pool's arguments in rksc.cache.policies, benchmark conditions in rksc.bench.conditions.

Each helper returns the checked value (e.g. a size string as bytes) or raises RkscError. None of them
may raise anything else, whatever it is given (the fuzz tests in tests/test_fuzz.py pin that).
Names are given as Python spells them (max_new_tokens) and shown as the CLI does (max-new-tokens).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rksc.errors import RkscError

DTYPES = ("auto", "bfloat16", "float32", "float16")  # activations and KV (rksc.models.compute)
WEIGHTS = ("auto", "fp32", "bf16", "fp16", "int8")  # weight formats (rksc.models.weights)
# SolveConfig's choices (rksc.reasoning.solver); here so the CLI's parser needs no torch
ANSWER_FORMATS = ("auto", "number", "choice", "math")
CACHES = ("pool", "shared", "none")
VERIFIERS = ("auto", "continue", "prompt")
LAYOUTS = ("shared", "diverse")  # diverse: each branch's own instruction before the problem
ASKS = ("auto", "off", "on")  # auto: on where the model's ASKS calibration passed its answer guard
MAX_BRANCHES = 1024  # more would only exhaust the KV pool, after tokenising every branch prompt
MAX_DEPTH = 64  # tree levels; each decodes every kept node's children after the one before
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1
MAX_CONCURRENCY = 1 << 16  # problems in flight


def label(name: str) -> str:
    return name.replace("_", "-")


def show(value, limit: int = 60) -> str:
    try:
        shown = repr(value)
    except Exception:  # e.g. an int with more digits than Python converts to text
        return f"a {type(value).__name__} that cannot be shown"
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, not a float that happens to be whole) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RkscError(f"{label(name)} must be an integer (got {show(value)})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise RkscError(f"{label(name)} must be at least {show(minimum)} (got {show(value)})")
    if maximum is not None and value > maximum:
        raise RkscError(f"{label(name)} must be at most {show(maximum)} (got {show(value)})")
    return value


def optional_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int | None:
    return None if value is None else integer(name, value, minimum, maximum)


def number(name: str, value, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> float:
    """A finite real number (not a bool) with value >= minimum (or > above) and <= maximum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RkscError(f"{label(name)} must be a number (got {show(value)})")
    try:
        f = float(value)
    except (OverflowError, ValueError):
        raise RkscError(f"{label(name)} is too large (got {show(value)})") from None
    if not math.isfinite(f):
        raise RkscError(f"{label(name)} must be a finite number (got {f})")
    if above is not None and not (f > above and (maximum is None or f <= maximum)):
        upper = "inf)" if maximum is None else f"{maximum}]"
        raise RkscError(f"{label(name)} must be in ({above}, {upper} (got {f})")
    if minimum is not None and f < minimum:
        raise RkscError(f"{label(name)} must be >= {minimum} (got {f})")
    if maximum is not None and f > maximum:
        raise RkscError(f"{label(name)} must be <= {maximum} (got {f})")
    return f


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RkscError(f"{label(name)} must be True or False (got {show(value)})")
    return value


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise RkscError(f"{label(name)} must be one of {', '.join(choices)} (got {show(value)})")
    return value


def text(name: str, value, empty_ok: bool = False) -> str:
    """A str that is valid Unicode (no lone surrogates, e.g. from undecodable command-line bytes)."""
    if not isinstance(value, str):
        raise RkscError(f"{label(name)} must be a string (got {type(value).__name__})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RkscError(f"{label(name)} {_bad_character(value, e.start)}") from None
    if not empty_ok and not value.strip():
        raise RkscError(f"the {label(name)} is empty")
    return value


def _bad_character(value: str, index: int) -> str:
    code = ord(value[index])
    if 0xDC80 <= code <= 0xDCFF:  # how Python carries bytes that were not UTF-8 (surrogateescape)
        return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {index + 1})"
    return f"holds a lone surrogate U+{code:04X} at character {index + 1}, which is not valid Unicode"


def dtype(value) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise RkscError(f"unknown dtype {show(value)}; choose one of {', '.join(DTYPES)}")
    return value


def weights(value) -> str:
    if not isinstance(value, str) or value not in WEIGHTS:
        raise RkscError(f"unknown weight format {show(value)}; choose one of {', '.join(WEIGHTS)}")
    return value


def question(value, lm=None) -> str:
    """A question to solve. With `lm` (a LoadedModel), a question with more characters than the
    model's context could hold even at its longest token is refused before it is tokenised."""
    if not isinstance(value, str):
        raise RkscError(f"the question must be a string (got {type(value).__name__})")
    if lm is not None and len(value) > lm.max_question_chars:
        raise RkscError(f"question too long: {len(value):,} characters, more than {lm.name}'s context of "
                        f"{lm.max_context} tokens can hold (at most {lm.max_question_chars:,} characters)")
    return text("question", value)


def problem(question_, gold_, context, lm=None) -> tuple[str, str | None, str | list[tuple[tuple[dict, ...], str]]]:
    """What Solver.solve is given about one problem: its question, gold answer and context: text shared by
    every branch, or a list with one (history, preamble) per branch (a BranchContext or a dict with
    "history", a list of user/assistant messages, and "preamble", text)."""
    if isinstance(context, (list, tuple)):
        context = [branch_context(c, i) for i, c in enumerate(context)]
        if not context:
            raise RkscError("the context is an empty list; give one per branch, or text")
    else:
        context = text("context", context, empty_ok=True)
    return question(question_, lm), gold(gold_), context


def branch_context(value, index: int) -> tuple[tuple[dict, ...], str]:
    """One branch's (history, preamble): earlier user/assistant messages, then text before its problem."""
    where = f"context[{index}]"
    if isinstance(value, dict):
        unknown = set(value) - {"history", "preamble"}
        if unknown:
            raise RkscError(f"{where} has unknown keys {sorted(unknown)}; use history and preamble")
        history, preamble = value.get("history", ()), value.get("preamble", "")
    elif hasattr(value, "history") and hasattr(value, "preamble"):
        history, preamble = value.history, value.preamble
    else:
        raise RkscError(f"{where} must be a dict with history and preamble (got {type(value).__name__})")
    if not isinstance(history, (list, tuple)):
        raise RkscError(f"{where}.history must be a list of messages (got {type(history).__name__})")
    messages = []
    for j, m in enumerate(history):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ("user", "assistant"):
            raise RkscError(f"{where}.history[{j}] must be {{\"role\": \"user\" or \"assistant\", \"content\": text}}")
        messages.append({"role": m["role"], "content": text(f"{where}.history[{j}].content", m["content"])})
    return tuple(messages), text(f"{where}.preamble", preamble, empty_ok=True)


def gold(value) -> str | None:
    """A reference answer: a string, or an int (taken as its digits); None when there is none."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        try:
            return str(int(value))
        except ValueError:  # more digits than Python converts
            raise RkscError("gold is an integer with too many digits; give it as a string") from None
    raise RkscError(f"gold must be a string or None (got {type(value).__name__})")


# sizes ----------------------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d{1,4}))?\s*([KMGT]?)(?:I?B)?\s*", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 1 << 62


def parse_size(value: str) -> int:
    """'2G', '512M', '1.5GiB', '1e9', '1048576' -> bytes (units are powers of 1024)."""
    m = _SIZE.fullmatch(value) if isinstance(value, str) and len(value) <= 100 else None
    if not m:
        raise RkscError(f"not a size: {show(value)} (use e.g. 2G, 512M or bytes)")
    digits, exponent, unit = m.groups()
    try:
        amount = Decimal(digits).scaleb(int(exponent or 0)) * _UNITS[unit.upper()]
    except (InvalidOperation, ArithmeticError):
        raise RkscError(f"not a size: {show(value)} (use e.g. 2G, 512M or bytes)") from None
    if amount > MAX_SIZE:
        raise RkscError(f"size too large: {show(value)}")
    if amount < 1:
        raise RkscError(f"size must be at least 1 byte: {show(value)}")
    return int(amount)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resident_memory() -> int | None:
    """This process's resident memory in bytes (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can take now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def kv_budget_fits(value: int) -> None:
    """A pool whose memory is committed at once (rksc serve) must fit in what is available now."""
    available = available_memory()
    if available is not None and value > available:
        raise RkscError(f"kv-budget of {_bytes(value)} is more than the {_bytes(available)} of memory this "
                        "machine has available now (the model loaded); lower --kv-budget")


def kv_budget(value) -> int | None:
    """Bytes for the KV block pool: None (the default), or a positive int no larger than the memory."""
    if value is None:
        return None
    value = integer("kv_budget", value, 1)
    memory = physical_memory()
    if memory and value > memory:
        raise RkscError(f"kv-budget of {_bytes(value)} is more than this machine's memory ({_bytes(memory)})")
    return value


def _bytes(n: int) -> str:
    if n >= 1 << 70:
        return "more than a billion TiB"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


# threads ----------------------------------------------------------------------------------------

def thread_count(value) -> int | None:
    return optional_integer("threads", value, 1, MAX_THREADS)


# files ----------------------------------------------------------------------------------------------

def output_file(path, flag: str = "--out", input_path: str | None = None) -> Path:
    """A file we may create or overwrite: its folder exists and is writable, it is not a folder,
    and it is not the input file. Checked before any slow work, so a typo costs nothing."""
    if not isinstance(path, str) or not path.strip():
        raise RkscError(f"{flag} is empty")
    text(flag, path)
    try:
        return _output_file(Path(path), path, flag, input_path)
    except (OSError, ValueError) as e:
        raise RkscError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None


def _output_file(p: Path, path: str, flag: str, input_path: str | None) -> Path:
    if p.is_dir():
        raise RkscError(f"{flag} {path} is a folder; give a file name")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise RkscError(f"{flag} {path}: folder {parent} {what}")
    if p.exists():
        if input_path is not None and _same_file(p, Path(input_path)):
            raise RkscError(f"{flag} {path} is the input file; writing results there would destroy the problems")
        if not os.access(p, os.W_OK):
            raise RkscError(f"{flag} {path}: permission denied")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise RkscError(f"{flag} {path}: cannot create files in {parent} (permission denied)")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_dir(path, flag: str = "--out") -> Path:
    """A folder we may create (with its parents) or write into; no part of the path is a file."""
    if not isinstance(path, str) or not path.strip():
        raise RkscError(f"{flag} is empty")
    text(flag, path)
    try:
        return _output_dir(Path(path), path, flag)
    except (OSError, ValueError) as e:
        raise RkscError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None


def _output_dir(p: Path, path: str, flag: str) -> Path:
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        if ancestor == p:
            raise RkscError(f"{flag} {path} is a file; this writes a folder (give a new or existing folder)")
        raise RkscError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise RkscError(f"{flag} {path}: cannot write in {ancestor} (permission denied)")
    # proven by doing it, not after the measurement (permission bits can lie, e.g. to root under /proc);
    # folders made for the proof are removed again
    made = [a for a in (p, *p.parents) if not a.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=p).close()
    finally:
        for a in made:
            try:
                a.rmdir()
            except OSError:
                pass
    return p
