"""`rksc solve`: one question, or a batch file (rksc.cli.batch)."""

from __future__ import annotations

import json
import os

from rksc import validate
from rksc.cli import batch
from rksc.cli.common import check_asks, check_ray, open_solver, quiet_transformers
from rksc.errors import RkscError
from rksc.reasoning.early import check_policies, check_thresholds
from rksc.reasoning.config import SolveConfig
from rksc.reasoning.solver import solver_args
from rksc.report import print_result


def config(args) -> SolveConfig:
    early_stop = check_policies(args.early_stop)  # first: of two bad flags, this one is named
    thresholds = check_thresholds(args.thresholds) if args.thresholds is not None else None
    return SolveConfig(branches=args.branches, max_new_tokens=args.max_new_tokens,
                       select=args.select, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, hints=args.hints, verify=args.verify, cache=args.cache,
                       depth=args.depth, keep=args.keep, verifier=args.verifier,
                       answer_format=args.answer_format,
                       early_stop=early_stop, layout=args.layout,
                       asks=args.asks, asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                       thresholds=thresholds)


def run(args) -> int:
    if args.question is not None and args.file:
        raise RkscError("give either a question or --file, not both")
    if args.question is None and not args.file:
        raise RkscError("give a question or --file problems.jsonl")
    if args.question is not None:
        validate.question(args.question)
    if args.out and not args.file:
        raise RkscError("--out is for --file runs; use --json to print one result")
    if args.ray is not None and not args.file:
        raise RkscError("--ray is for --file runs")
    validate.optional_integer("concurrency", args.concurrency, 1, validate.MAX_CONCURRENCY)
    solve = config(args)  # validate before the (slow) model load
    check_asks(args.model, solve.asks, solve.asks_tau)
    if args.ray is not None and solve.cache != "pool":
        raise RkscError("--ray runs on the block pool (--cache pool)")
    check_ray(args)
    problems = batch.read_problems(args.file) if args.file else None
    results = batch.results_file(args, problems, solve)
    solver_args(args.threads, args.kv_budget, args.block_size, args.evict)
    if args.backend and solve.cache != "pool":
        raise RkscError(f"--cache {solve.cache} is a local baseline; --backend runs the engine "
                        "path (--cache pool)")
    solver_kwargs = dict(model=args.model, dtype=args.dtype, weights=args.weights,
                         threads=args.threads, kv_budget=args.kv_budget,
                         block_size=args.block_size, evict=args.evict)
    if args.backend:  # the model is on the server: its tokenizer here, no weights
        solver_kwargs = dict(model=args.model, backend=args.backend,
                             backend_model=args.backend_model,
                             api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    if problems is not None:
        return batch.solve_file(solver_kwargs, solve, problems, args, results)
    quiet_transformers()
    result = open_solver(solver_kwargs).solve(args.question, solve)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_result(result)
    return 0
