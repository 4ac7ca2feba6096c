"""Problems in flight on the engine: problems/hour and latency at concurrency K = 1, 2, 4, ...

Regime: GSM8K test problems (deterministic file order from --offset), natural prompts (no filler),
B branches, N new tokens, greedy, the verifier as a continuation; one model load; every K solves
the same problems from a cold prefix index, K = 1 first. Reports per K: wall time, problems/hour,
mean and median latency per problem, output tokens/s, mean decode rows per step, accuracy, and
agreement with K = 1 (selected answers; branches token-identical). Writes JSON (--out) and a plot.

    python benchmarks/concurrency.py --model qwen2.5-coder-0.5b --problems 16 --branches 8 -n 512 --ks 1,2,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import finish

from rksc import SolveConfig, Solver
from rksc.bench.datasets import load_problems
from rksc.errors import RkscError


def run(solver: Solver, problems, config: SolveConfig, k: int) -> dict:
    solver.engine.drop_cached()
    stats = solver.engine.stats
    before = (stats.decode_steps, stats.decode_rows, stats.decode_s, stats.prefill_s)
    items = [{"question": p.question, "gold": p.gold, "answer_format": p.kind} for p in problems]
    t = time.perf_counter()
    results = [r for _, r in solver.solve_many(items, config, concurrency=k)]
    wall = time.perf_counter() - t
    errors = [str(r) for r in results if isinstance(r, RkscError)]
    if errors:
        raise SystemExit(f"K={k}: {errors[0]}")
    steps, rows = stats.decode_steps - before[0], stats.decode_rows - before[1]
    lat = [r.timing.total_s for r in results]
    return {
        "k": k, "wall_s": wall, "problems_per_hour": len(results) * 3600 / wall,
        "mean_latency_s": statistics.fmean(lat), "median_latency_s": statistics.median(lat),
        "out_tok_s": sum(r.timing.new_tokens for r in results) / wall,
        "decode_steps": steps, "mean_rows_per_decode_step": rows / steps if steps else 0.0,
        "decode_ms_per_step": (stats.decode_s - before[2]) / steps * 1000 if steps else 0.0,
        "prefill_s": stats.prefill_s - before[3],
        "accuracy": sum(bool(r.correct) for r in results) / len(results),
        "answers": [r.answer for r in results],
        "branch_tokens": [[b.token_ids for b in r.branches] for r in results],
        "finished_branches": sum(b.stop_reason == "finished" for r in results for b in r.branches),
        "branches": sum(len(r.branches) for r in results),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["problems_per_hour"] for r in rows], "o-", label="problems/hour")
    ax.set_xlabel("problems in flight (K)")
    ax.set_ylabel("problems/hour")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax2 = ax.twinx()
    ax2.plot(ks, [r["mean_latency_s"] for r in rows], "s--", color="tab:red", label="mean latency")
    ax2.set_ylabel("mean latency per problem (s)")
    fig.legend(loc="lower right", bbox_to_anchor=(0.85, 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--branches", "-b", type=int, default=8)
    ap.add_argument("--max-new-tokens", "-n", type=int, default=512)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--out", default=None, help="JSON path; the plot goes beside it")
    args = ap.parse_args()

    solver = Solver.load(args.model, args.dtype)
    problems = load_problems("gsm8k", args.offset, args.problems, progress=False)
    config = SolveConfig(branches=args.branches, max_new_tokens=args.max_new_tokens)
    solver.solve("Warm-up: a box holds 3 red and 4 blue balls. How many balls?", config, max_new_tokens=4)
    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        rows.append(run(solver, problems, config, k))
        r = rows[-1]
        print(f"K={k}: {r['wall_s']:.0f} s, {r['problems_per_hour']:.0f} problems/h, mean latency "
              f"{r['mean_latency_s']:.1f} s, {r['mean_rows_per_decode_step']:.1f} rows/step at "
              f"{r['decode_ms_per_step']:.1f} ms", flush=True)
    base = rows[0]
    print(f"{args.model} {args.dtype}, {len(problems)} GSM8K problems, B={args.branches}, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'K':>3s} {'wall s':>7s} {'problems/h':>11s} {'x K=1':>6s} {'mean lat s':>11s} {'tok/s':>7s} "
          f"{'rows/step':>10s} {'ms/step':>8s} {'acc':>5s} {'same answer':>12s} {'same tokens':>12s}")
    for r in rows:
        r["speedup_vs_k1"] = r["problems_per_hour"] / base["problems_per_hour"]
        r["same_answer_as_k1"] = sum(a == b for a, b in zip(r["answers"], base["answers"])) / len(problems)
        pairs = [(x, y) for rx, ry in zip(r["branch_tokens"], base["branch_tokens"]) for x, y in zip(rx, ry)]
        r["same_branch_tokens_as_k1"] = sum(x == y for x, y in pairs) / len(pairs)
        print(f"{r['k']:3d} {r['wall_s']:7.0f} {r['problems_per_hour']:11.0f} {r['speedup_vs_k1']:6.2f} "
              f"{r['mean_latency_s']:11.1f} {r['out_tok_s']:7.1f} {r['mean_rows_per_decode_step']:10.1f} "
              f"{r['decode_ms_per_step']:8.1f} {r['accuracy']:5.0%} {r['same_answer_as_k1']:12.0%} "
              f"{r['same_branch_tokens_as_k1']:12.0%}")
    for r in rows:
        del r["branch_tokens"]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, Path(args.out).with_suffix(".png"))
    finish({"model": args.model, "dtype": args.dtype, "problems": len(problems), "offset": args.offset,
            "branches": args.branches, "max_new_tokens": args.max_new_tokens, "results": rows}, args.out)


if __name__ == "__main__":
    main()
