"""Shared bits of the benchmark scripts: machine description, problem sample, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rksc.bench.harness import machine

ROOT = Path(__file__).resolve().parent.parent
GSM8K_SAMPLE = ROOT / "tests" / "data" / "gsm8k_test_sample.jsonl"


def gsm8k_sample(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GSM8K_SAMPLE.open()]
    return rows[:n]


def finish(summary: dict, out: str | None) -> None:
    summary["command"] = " ".join([Path(sys.executable).name] + sys.argv)
    summary["machine"] = machine()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


def decoding_rows(engine, prefixes: list[list[int]], rows: int, max_tokens: int = 100_000) -> list:
    """`rows` decode rows spread evenly over the given prefixes (each prefix computed once and forked
    copy-free, a one-token suffix per row), stepped until every row is past its prompt. Returns the
    rows' sequences; the prefixes are released (their blocks stay while the rows use them)."""
    from rksc.engine.sequence import Sequence

    held = [engine.add(Sequence(ids, hold=True)) for ids in prefixes]
    while not all(p.finished for p in held):
        engine.step()
    seqs = [engine.add(Sequence(held[i % len(held)].ids + [7 + i], max_tokens, parent=held[i % len(held)]))
            for i in range(rows)]
    for p in held:
        engine.release(p)
    while not all(s.decoding for s in seqs):
        engine.step()
    return seqs


def step_ms(engine, warmup: int, steps: int) -> float:
    """Median wall time of one engine step (decode of every running row), warm-up steps dropped."""
    import statistics
    import time

    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def context_ids(tokens: int, offset: int = 0) -> list[int]:
    """A deterministic stand-in context of `tokens` ids (distinct per offset: no prefix sharing)."""
    return [(i * 7 + offset * 131) % 5000 + 100 for i in range(tokens)]
