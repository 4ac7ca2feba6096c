"""`rksc bench`: baselines and rksc side by side on a dataset; here, on a server or on Ray."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rksc import validate
from rksc.bench.combine import combine, save_run
from rksc.bench.conditions import CONDITIONS
from rksc.bench import require_extra
from rksc.bench.harness import BenchConfig, machine, run_bench
from rksc.bench.plots import write_plots
from rksc.bench.summary import print_summary
from rksc.cli.common import check_asks, check_ray, open_solver, quiet_transformers
from rksc.cluster.ray import Workers
from rksc.errors import RkscError
from rksc.models.registry import DEFAULT_MODEL
from rksc.reasoning.early import check_thresholds
from rksc.reasoning.solver import Solver


def run(args) -> int:
    require_extra("bench")
    check_ray(args)
    model = args.model or DEFAULT_MODEL
    out = args.out or f"runs/bench-{Path(model).name}-{args.dataset}-{args.regime}"
    validate.output_dir(out)
    validate.thread_count(args.threads)
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    thresholds = check_thresholds(args.thresholds) if args.thresholds is not None else None
    config = BenchConfig(model=model, dtype=args.dtype, weights=args.weights,
                         dataset=args.dataset, offset=args.offset, limit=args.limit,
                         conditions=conditions, regime=args.regime,
                         prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
                         branches=args.branches, select=args.select, warmup=args.warmup, out=out,
                         plots=args.plots, warm_index=args.warm_index,
                         concurrency=args.concurrency, workload=args.workload,
                         asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                         thresholds=thresholds)
    if any(CONDITIONS[c].asks for c in config.conditions):
        check_asks(model, "on", config.asks_tau)
    if args.backend:
        summary = _on_backend(config, args)
    elif args.ray is not None:
        summary = _on_ray(config, args)
    else:
        quiet_transformers()
        solver = (Solver.load(model, args.dtype, threads=args.threads, weights=args.weights)
                  if args.threads else None)
        summary = run_bench(config, solver=solver)
        summary["machine"] = machine()
    summary["command"] = "rksc " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("rksc") else None
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    if config.plots:
        lines = Path(out, "results.jsonl").read_text().splitlines()
        write_plots([json.loads(line) for line in lines], summary, Path(out))
    print_summary(summary)
    if "cluster" in summary:
        c = summary["cluster"]
        shards = ", ".join(f"{s['offset']}+{s['limit']}: {sum(s['walls'].values()):.1f} s"
                           for s in summary["runs"])
        print(f"cluster: {c['describe']}; {c['wall_s']:.1f} s on the driver for "
              f"{summary['problems']} problems x {len(summary['per_condition'])} conditions "
              f"(after {c['start_s']:.1f} s starting the workers); "
              f"each shard ran every condition in turn: " + shards)
    plots = ", plots: *.png" if config.plots else ""
    print(f"results: {out}/results.jsonl, {out}/summary.json" + plots)
    return 0


def _on_backend(config: BenchConfig, args) -> dict:
    """The engine conditions against an OpenAI-compatible server, on its batching."""
    if args.ray is not None:
        raise RkscError("bench --backend runs on the server's batching; drop --ray")
    local = [c for c in config.conditions
             if CONDITIONS[c].path != "pool" or "layers" in CONDITIONS[c].early_stop]
    if local:
        raise RkscError(f"conditions {','.join(local)} need the local model; with --backend run "
                        "engine conditions only (e.g. --conditions rksc,cgee)")
    quiet_transformers()
    solver = open_solver(dict(model=config.model, backend=args.backend,
                              backend_model=args.backend_model,
                              api_key=args.api_key or os.environ.get("OPENAI_API_KEY")))
    summary = run_bench(config, solver)
    summary["backend"] = {"url": solver.engine.base_url, **vars(solver.engine.features)}
    summary["machine"] = machine()
    return summary


def _on_ray(config: BenchConfig, args) -> dict:
    """The harness on one contiguous shard per Ray worker, pooled as one run; each shard is also
    kept in <out>/shard-<k>. The pooled walls are the shards' summed (one worker's time); the
    cluster's own is the driver's elapsed time."""
    t = time.perf_counter()
    workers = Workers.start(args.ray or None, dict(model=config.model, dtype=config.dtype,
                                                   weights=config.weights, threads=args.threads),
                            args.ray_workers)
    try:
        start_s, t = time.perf_counter() - t, time.perf_counter()
        print(f"rksc: bench on {workers.describe()}", file=sys.stderr)
        runs = workers.bench(config)
        wall = time.perf_counter() - t
        describe = workers.describe()
    finally:
        workers.close()
    names = []
    for k, shard in enumerate(runs):
        names.append(str(Path(config.out, f"shard-{k}")))
        save_run(names[-1], shard)
    summary, records, traces = combine(runs, names)
    summary["config"] = asdict(config)
    summary["cluster"] = {"describe": describe, "workers": len(runs), "wall_s": wall,
                          "start_s": start_s, "address": args.ray or None}
    save_run(config.out, (summary, records, traces))
    return summary
