"""`rksc asks-calibrate`: ASKS's answer-level guard on a calibration split; saves the model's default."""

from __future__ import annotations

import json
from pathlib import Path

from rksc import validate
from rksc.bench import asks_guard, require_extra
from rksc.cli.common import quiet_transformers
from rksc.errors import RkscError
from rksc.models.registry import DEFAULT_MODEL
from rksc.reasoning import profiles


def run(args) -> int:
    require_extra("asks-calibrate")
    model = args.model or DEFAULT_MODEL
    validate.integer("offset", args.offset, 0)
    validate.integer("limit", args.limit, 1)
    validate.integer("branches", args.branches, 2, validate.MAX_BRANCHES)
    validate.integer("max_new_tokens", args.max_new_tokens, 1)
    validate.integer("prefix_tokens", args.prefix_tokens, 0)
    validate.integer("concurrency", args.concurrency, 1, validate.MAX_CONCURRENCY)
    validate.number("target", args.target, above=0, maximum=1)
    validate.thread_count(args.threads)
    if asks_guard.max_changes(args.limit, args.target) < 0:
        raise RkscError(f"--limit {args.limit}: a bound of {args.target:.0%} needs at least "
                        f"{asks_guard.min_problems(args.target)} problems")
    out = Path(args.out or f"runs/asks-calibrate-{Path(model).name}")
    validate.output_dir(str(out))
    save = None
    if args.save is not None:
        save = Path(args.save) if args.save else profiles.asks_path_for(model)
        validate.output_dir(str(save.parent), "--save")
    meta = {"model": model, "dtype": args.dtype, "weights": args.weights, "offset": args.offset, "limit": args.limit,
            "branches": args.branches, "max_new_tokens": args.max_new_tokens, "prefix_tokens": args.prefix_tokens}
    if (out / "meta.json").is_file():  # a rerun resumes only the same calibration
        try:
            before = json.loads((out / "meta.json").read_text())
        except ValueError:
            before = None
        if before != meta:
            raise RkscError(f"--out {out} holds a calibration with other settings ({before}): resume it with "
                            "those, or use another --out")
    quiet_transformers()
    from rksc.bench.datasets import load_problems
    from rksc.bench.harness import branch_contexts
    from rksc.reasoning.solver import SolveConfig, Solver

    problems = load_problems("gsm8k", args.offset, args.limit)
    solver = Solver.load(model, args.dtype, threads=args.threads, weights=args.weights)
    workload = "diverse"
    config = SolveConfig(branches=args.branches, max_new_tokens=args.max_new_tokens, layout="diverse")
    contexts = branch_contexts(solver, problems, workload, args.offset, args.branches, args.prefix_tokens)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(meta) + "\n")
    report = asks_guard.run(solver, problems, contexts, config, out, args.concurrency, args.target)
    settings = {"workload": workload, "prefix_tokens": args.prefix_tokens, "branches": args.branches,
                "max_new_tokens": args.max_new_tokens, "select": config.select,
                "dtype": solver.lm.dtype, "compute": solver.lm.compute.describe()}
    split = {"dataset": "gsm8k", "offset": args.offset, "limit": args.limit}
    doc = asks_guard.profile_doc(solver.lm.name, report, split, settings)
    (out / "report.json").write_text(json.dumps({**report, **settings, "split": split}, indent=2))
    asks_guard.print_report(report)
    if save is not None:
        profiles.save_asks(doc, save)
        print(f"saved: {save}")
    print(f"results: {out}/report.json, {out}/answers.jsonl")
    return 0
