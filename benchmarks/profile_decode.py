"""Where one engine decode step spends its time (torch profiler).

Regime: default model, bf16, P contexts of C tokens forked by B rows, greedy; profiles S steps
after warm-up and prints the top operators by self CPU time, plus Python-side overhead.

    python benchmarks/profile_decode.py --model qwen2.5-coder-0.5b --batch 8 --context 1024
"""

from __future__ import annotations

import argparse
import time

from _common import context_ids, decoding_rows
from torch.profiler import ProfilerActivity, profile

from rksc.engine.engine import Engine
from rksc.models.loader import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefixes", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25, help="operators to print")
    args = ap.parse_args()

    model = load(args.model).model
    engine = Engine(model, kv_budget=2 << 30)
    decoding_rows(engine, [context_ids(args.context, p) for p in range(args.prefixes)], args.batch)
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t) / args.steps * 1000
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{wall:.1f} ms per step under the profiler (B={args.batch}, context {args.context})")


if __name__ == "__main__":
    main()
