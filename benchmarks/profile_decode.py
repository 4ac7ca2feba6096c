"""Where one batched decode step spends its time (torch profiler), rksc block pool path.

Regime: default model, bf16, a C-token context shared by B rows, greedy; profiles S steps after
warm-up and prints the top operators by self CPU time, plus Python-side overhead (wall minus ops).

    python benchmarks/profile_decode.py --model qwen2.5-coder-0.5b --batch 8 --context 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rksc.engine.decode import decode
from rksc.engine.pool_runner import PoolRunner
from rksc.engine.sampler import Sampler, Sampling
from rksc.models.loader import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25, help="operators to print")
    args = ap.parse_args()

    model = load(args.model).model
    runner = PoolRunner.create(model, budget_bytes=1 << 30)
    prefix = runner.prefill((torch.arange(args.context) % 5000 + 100).tolist())
    batch, logits = runner.extend(prefix, [[7 + i] for i in range(args.batch)])
    columns = decode(runner, batch, logits, Sampler(Sampling(), args.batch), 10_000, set())
    for _ in range(3):
        next(columns)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            next(columns)
        wall = (time.perf_counter() - t) / args.steps * 1000
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{wall:.1f} ms per step under the profiler (B={args.batch}, context {args.context})")


if __name__ == "__main__":
    main()
