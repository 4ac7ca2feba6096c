"""Block pool vs B separate caches, and the prefix index hit rate across requests.

Part 1 (each cache in its own fresh process, so peak resident memory is its own): default model,
bf16, a P-token prefix, B branches with 1-token suffixes, S decode steps. `pool` holds the prefix
once in blocks and forks it; `separate` is a per-batch DynamicCache with one prefix copy per row.
Reports KV bytes held, peak RSS (ru_maxrss), and median ms per decode step.
Part 2: the same N GSM8K problems solved twice on one pool (greedy, B branches, few new tokens);
reports how many prompt tokens the prefix index served from cache in each pass.

    python benchmarks/pool.py --model qwen2.5-coder-0.5b --prefix 1024 --branches 8 --problems 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import decoding_rows, finish, gsm8k_sample

from rksc.engine.decode import decode
from rksc.engine.engine import Engine
from rksc.engine.dense import DenseRunner
from rksc.engine.sampler import Sampler, Sampling
from rksc.models.loader import load


def measure(model_name: str, cache: str, prefix_len: int, branches: int, steps: int) -> dict:
    model = load(model_name).model
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = (torch.arange(prefix_len) % 5000 + 100).tolist()
    times, held, prefix_bytes = [], 0, 0
    if cache == "pool":  # the prefix once in blocks, forked copy-free by every branch
        engine = Engine(model, kv_budget=4 << 30)
        seqs = decoding_rows(engine, [ids], branches, max_tokens=steps + 2)
        prefix_bytes = -(-len(ids) // engine.pool.block_size) * engine.runner.block_bytes
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            held = max(held, engine.runner.kv_bytes([s.table for s in seqs]))
    else:  # a per-batch DynamicCache: one copy of the prefix per row
        runner = DenseRunner(model)
        prefix = runner.prefill(ids)
        prefix_bytes = prefix.nbytes
        batch, logits = runner.extend(prefix, [[7 + i] for i in range(branches)])
        last = time.perf_counter()
        for _ in decode(runner, batch, logits, Sampler(Sampling(), branches), steps, set()):
            now = time.perf_counter()
            times.append(now - last)
            last = now
            held = max(held, batch.kv_bytes)
    return {"cache": cache, "kv_bytes": held, "prefix_kv_bytes": prefix_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": rss_loaded, "ms_per_step": statistics.median(times[2:]) * 1000}


def hit_rate(model_name: str, problems: int, branches: int, new_tokens: int) -> list[dict]:
    from rksc import SolveConfig, Solver

    solver = Solver.load(model_name)
    config = SolveConfig(branches=branches, max_new_tokens=new_tokens)
    passes = []
    for n in (1, 2):
        stats = solver.engine.pool.stats
        before = (stats.queried_tokens, stats.hit_tokens)
        t = time.perf_counter()
        for item in gsm8k_sample(problems):
            solver.solve(item["question"], config)
        queried, hit = stats.queried_tokens - before[0], stats.hit_tokens - before[1]
        passes.append({"pass": n, "queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried,
                       "seconds": time.perf_counter() - t, "evictions": stats.evictions})
    return passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--only", choices=("pool", "separate"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.only:  # child process: one cache, one JSON line
        print(json.dumps(measure(args.model, args.only, args.prefix, args.branches, args.steps)))
        return

    side = {}
    for cache in ("pool", "separate"):
        cmd = [sys.executable, __file__, "--model", args.model, "--prefix", str(args.prefix), "--branches",
               str(args.branches), "--steps", str(args.steps), "--only", cache]
        side[cache] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"{args.model}, prefix {args.prefix} tokens, B={args.branches}, {args.steps} decode steps")
    print(f"{'cache':10s} {'KV held MB':>11s} {'peak RSS GB':>12s} {'ms/step':>8s}")
    for cache, r in side.items():
        print(f"{cache:10s} {r['kv_bytes'] / 2**20:11.1f} {r['peak_rss_bytes'] / 2**30:12.2f} {r['ms_per_step']:8.1f}")
    passes = hit_rate(args.model, args.problems, args.branches, args.new_tokens)
    for p in passes:
        print(f"pass {p['pass']}: prefix index served {p['hit_tokens']} of {p['queried_tokens']} prompt tokens "
              f"({p['hit_rate']:.1%}), {p['seconds']:.1f} s for {args.problems} problems")
    finish({"model": args.model, "prefix_tokens": args.prefix, "branches": args.branches, "side_by_side": side,
            "hit_rate": passes}, args.out)


if __name__ == "__main__":
    main()
