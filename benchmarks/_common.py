"""Shared bits of the benchmark scripts: machine description, problem sample, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K_SAMPLE = ROOT / "tests" / "data" / "gsm8k_test_sample.jsonl"


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def gsm8k_sample(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GSM8K_SAMPLE.open()]
    return rows[:n]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def finish(summary: dict, out: str | None) -> None:
    summary["command"] = " ".join([Path(sys.executable).name] + sys.argv)
    summary["machine"] = machine()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
