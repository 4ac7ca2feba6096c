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
