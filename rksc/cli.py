"""Command line: `rksc solve`, `rksc serve`, `rksc models list|pull|verify`, `rksc bench`, `rksc calibrate`,
`rksc asks-curve`, `rksc info`.

User mistakes exit with code 2 and one line on stderr; nothing prints a traceback for them.
Exit codes: 0 done, 2 a user error or bad lines reported in a batch, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rksc import validate
from rksc.bench import require_extra
from rksc.cache.policies import DEFAULT_POLICY, POLICIES
from rksc.errors import RkscError
from rksc.reasoning.early import check_policies, check_thresholds


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the usage block)
        raise RkscError(f"{message} (see '{self.prog} --help')")


def _solve_args(p: argparse.ArgumentParser) -> None:
    from rksc.reasoning.select import METHODS
    from rksc.reasoning.solver import CACHES, FORMATS, VERIFIERS

    p.add_argument("question", nargs="?", help="the problem text (or use --file)")
    p.add_argument("--file", help="JSONL file, one {\"question\": ..., \"answer\": optional gold} per line")
    p.add_argument("--out", help="with --file: write one JSON result per line here (default: stdout)")
    p.add_argument("--model", default=None, help="registry name, Hugging Face folder or .gguf file "
                                                 "(default: qwen2.5-coder-0.5b)")
    _compute_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    _backend_args(p)
    p.add_argument("--branches", "-b", type=int, default=8, help="reasoning branches per problem")
    p.add_argument("--max-new-tokens", "-n", type=int, default=512,
                   help="token cap per branch (default 512: most branches end on their own before it)")
    p.add_argument("--select", default="composite", choices=METHODS, help="how one branch is chosen")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; branch i uses (seed, i)")
    p.add_argument("--no-hints", dest="hints", action="store_false",
                   help="same instruction for every branch (use with --temperature > 0)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the verifier")
    p.add_argument("--cache", default="pool", choices=CACHES,
                   help="pool: paged KV blocks, prefix held once (default); shared: prefix copied "
                        "per row; none: No-KV baseline")
    p.add_argument("--kv-budget", type=_size, default=None,
                   help="bytes for the KV block pool, e.g. 2G or 512M (default: 1/4 of free memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    _evict_arg(p)
    p.add_argument("--answer-format", default="auto", choices=FORMATS)
    p.add_argument("--verifier", default="auto", choices=VERIFIERS,
                   help="continue: ask on top of each branch's own KV (pool); prompt: the paper's separate "
                        "verification prompt; auto: continue on the pool, else prompt")
    p.add_argument("--depth", type=int, default=1, help="tree of thoughts depth (1 = plain best-of-B)")
    p.add_argument("--keep", type=int, default=2, help="tree: nodes kept and expanded at each depth")
    p.add_argument("--concurrency", "-k", type=int, default=None,
                   help="with --file: problems in flight on the engine, sharing each decode step "
                        "(default: as many as make about 32 decode rows, e.g. 4 at 8 branches)")
    p.add_argument("--early-stop", default="",
                   help="early exit, comma-separated: exact (lossless), beta, confidence, repeat, probe, "
                        "skip (verifier skip), layers (verifier layer exit), or cgee (the model's calibrated "
                        "combination, see `rksc calibrate`)")
    _thresholds_arg(p)
    _asks_args(p)
    p.add_argument("--layout", default="shared", choices=("shared", "diverse"),
                   help="shared: one problem prefix, a hint after it per branch (default); diverse: each "
                        "branch its own instruction before the problem (exact prefix caching then shares "
                        "only the chat template's head; see --asks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    _ray_args(p)


def _compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=validate.DTYPES,
                   help="activations and KV cache: auto (default: bfloat16 on CPUs with bf16 matrix units, "
                        "float32 on others), bfloat16, float32 or float16")
    p.add_argument("--weights", default="auto", choices=validate.WEIGHTS,
                   help="weight format: auto (default: the fastest exact one here, see `rksc info`), fp32, "
                        "bf16 (needs AMX or AVX-512-BF16) or fp16 (AVX2; fp32 products)")


def _thresholds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", default=None, metavar="FIELD=VALUE,...",
                   help="early-exit thresholds set by hand on top of the model's calibration profile, e.g. "
                        "exit_margin=8,exit_patience=3,exit_min_layer=18; the policies they touch run "
                        "uncalibrated (no disagreement bound) and results say so")


def _evict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--evict", default=DEFAULT_POLICY, choices=tuple(POLICIES),
                   help=f"which cached KV block leaves first when the pool is full (default {DEFAULT_POLICY}): "
                        "leaf (least recently used, a chain's last block first), lru (least recently used), "
                        "rksc (least attention / (depth + 1))")


def _asks_args(p: argparse.ArgumentParser, switch: bool = True) -> None:
    if switch:
        p.add_argument("--asks", default="off", choices=("off", "on"),
                       help="approximate KV reuse for prompts that are not token-identical (off by default; "
                            "on uses the model's calibrated tau, see `rksc asks-curve`)")
    p.add_argument("--asks-tau", type=float, default=None,
                   help="ASKS similarity threshold in [0, 1] (default: the model's calibration; above 1 never reuses)")
    p.add_argument("--asks-recompute", type=float, default=None,
                   help="ASKS: fraction of reused tokens recomputed anyway (default: the calibration's, else 0.15)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="fan out over a Ray cluster, one worker per node (or per --threads cores): no ADDRESS "
                        "starts a local cluster, 'auto' joins the one `ray start` runs here (pip install 'rksc[ray]')")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --ray: this many workers, spread over the nodes (default: one per node, or one "
                        "per --threads cores)")


def _check_ray(args) -> None:
    """--ray and --ray-workers make sense, and Ray is installed: before anything slow."""
    if args.ray is None:
        if args.ray_workers is not None:
            raise RkscError("--ray-workers needs --ray")
        return
    validate.optional_integer("ray-workers", args.ray_workers, 1)
    from rksc.cluster.ray import require

    require()


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, metavar="URL",
                   help="run on an OpenAI-compatible server (rksc serve, vLLM, SGLang, llama.cpp) at URL, e.g. "
                        "http://127.0.0.1:8000/v1; --model then names its tokenizer (registry name or folder)")
    p.add_argument("--backend-model", default=None, help="the model's id on the server (default: the only one)")
    p.add_argument("--api-key", default=None, help="bearer token for --backend (default: $OPENAI_API_KEY)")


def _open_solver(solver_kwargs: dict):
    """Solver.open here; on a remote backend, say what the server gives."""
    from rksc.reasoning.solver import Solver

    solver = Solver.open(**solver_kwargs)
    if solver.remote:
        print(f"rksc: backend {solver.engine.base_url}: {solver.engine.features.describe()}", file=sys.stderr)
        for warning in solver.engine.warnings:
            print(f"rksc: warning: {warning}", file=sys.stderr)
    return solver


def _size(text: str) -> int:
    try:
        return validate.parse_size(text)
    except RkscError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rksc", description="Fast multi-branch LLM reasoning on CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _solve_args(sub.add_parser("solve", help="solve a problem with B branches, a verifier and selection"))
    models = sub.add_parser("models", help="list or prepare the registry models")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    msub.add_parser("list", help="name, family, size and whether prepared")
    pull = msub.add_parser("pull", help="download, verify and convert a model once")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="prepare again even if present")
    pull.add_argument("--keep-gguf", action="store_true",
                      help="also keep the source GGUF file (sha256-verified) in $RKSC_HOME/gguf, e.g. to run the same "
                           "weights on llama.cpp")
    verify = msub.add_parser("verify", help="check every file of a prepared model against its recorded sha256")
    verify.add_argument("name")
    _bench_args(sub.add_parser("bench", help="run baselines and rksc side by side on a dataset"))
    _calibrate_args(sub.add_parser("calibrate", help="fit early-exit thresholds on a calibration split"))
    _serve_args(sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, solve)"))
    info = sub.add_parser("info", help="this machine, the dtype, weight format and kernels rksc runs here, and why")
    _compute_args(info)
    info.add_argument("--measure", action="store_true",
                      help="time every weight format that runs here on one layer (1, 8, 32 and 512 rows)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    _asks_curve_args(sub.add_parser("asks-curve", help="ASKS: reuse rate, time saved and fidelity per tau; "
                                                        "pick the default tau on a calibration split"))
    return parser


def _asks_curve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry name, Hugging Face folder or .gguf file")
    _compute_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--recompute", default="0,0.15,0.3", help="recompute fractions to sweep, comma-separated")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared with full recompute")
    p.add_argument("--min-run", type=int, default=8, help="shortest run of identical tokens reused")
    p.add_argument("--probe-layer", type=int, default=1,
                   help="layer whose KV the similarity test compares (layers 0..L run on every token; default 1)")
    p.add_argument("--problems", type=int, default=None,
                   help="problems per dataset in each split (default: 16 GSM8K and 8 ARC-Challenge)")
    p.add_argument("--out", default=None, help="output folder (default runs/asks-curve-<model>)")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="PATH",
                   help="save the chosen tau as the model's ASKS calibration (default path "
                        "$RKSC_HOME/profiles/<model>.asks.json), which --asks on then uses")


def _check_asks(model: str | None, asks: str, tau: float | None) -> None:
    """--asks on needs a tau: given, or the model's calibration (checked before the slow load)."""
    if asks != "on" or tau is not None:
        return
    from rksc.models.loader import display_name
    from rksc.models.registry import DEFAULT_MODEL
    from rksc.reasoning import profiles

    name = display_name(model or DEFAULT_MODEL)
    if profiles.find_asks(name) is None:
        raise RkscError(profiles.asks_missing(name))


def cmd_asks_curve(args) -> int:
    from dataclasses import replace

    from rksc.bench import asks_curve
    from rksc.models.registry import DEFAULT_MODEL

    require_extra("asks-curve")
    model = args.model or DEFAULT_MODEL
    try:
        recomputes = sorted({float(x) for x in args.recompute.split(",") if x.strip()})
    except ValueError:
        raise RkscError(f"--recompute takes comma-separated fractions, not {args.recompute!r}") from None
    if not recomputes or not all(0 <= r <= 1 for r in recomputes):
        raise RkscError("--recompute fractions must be in [0, 1]")
    validate.integer("tokens", args.tokens, 1)
    validate.integer("min_run", args.min_run, 1)
    validate.integer("probe_layer", args.probe_layer, 1)
    validate.thread_count(args.threads)
    cal, ev = asks_curve.CALIBRATION, asks_curve.EVALUATION
    if args.problems is not None:
        validate.integer("problems", args.problems, 1)
        cal = tuple(replace(s, limit=args.problems) for s in cal)
        ev = tuple(replace(s, limit=args.problems) for s in ev)
    out = Path(args.out or f"runs/asks-curve-{Path(model).name}")
    validate.output_dir(str(out))
    _quiet_transformers()
    report = asks_curve.run(model, args.dtype, recomputes, args.tokens, out, args.save, args.min_run, cal, ev,
                            args.threads, args.probe_layer, weights=args.weights)
    asks_curve.print_report(report)
    print(f"results: {out}/report.json, {out}/calibration.jsonl, {out}/evaluation.jsonl, plot {out}/asks-curve.png")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry name, Hugging Face folder or .gguf file")
    _compute_args(p)
    p.add_argument("--dataset", default="gsm8k", help="gsm8k (default)")
    p.add_argument("--offset", type=int, default=None, help="first problem of the split (gsm8k: 1019)")
    p.add_argument("--limit", type=int, default=None, help="problems in the split (gsm8k: 300)")
    p.add_argument("--split", default=None, metavar="FIRST-LAST",
                   help="the split as problem indices, both included (gsm8k: 1019-1318); instead of --offset/--limit")
    p.add_argument("--branches", "-b", type=int, default=8)
    p.add_argument("--max-new-tokens", "-n", type=int, default=512)
    p.add_argument("--select", default="composite")
    p.add_argument("--concurrency", "-k", type=int, default=4, help="problems in flight while recording")
    p.add_argument("--target", type=float, default=0.01,
                   help="highest disagreement with full computation allowed (its 95%% upper bound)")
    p.add_argument("--out", default=None, help="folder for traces.jsonl and fit.json "
                                               "(default runs/calibrate-<model>-<dataset>)")
    p.add_argument("--profile", default=None,
                   help="where to save the profile (default $RKSC_HOME/profiles/<model>.json)")
    p.add_argument("--record-only", action="store_true", help="record the full runs, do not fit")
    p.add_argument("--order-from", default=None, metavar="FOLDER",
                   help="learn the order in which settings are tested from the runs another `rksc calibrate` "
                        "recorded on other problems (same model and settings); this split then confirms it")
    p.add_argument("--no-layers", dest="layers", action="store_false",
                   help="do not ask the verifier questions again to record lens margins (traces recorded "
                        "without them); the layers gate then stays uncalibrated")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="do not probe the branches' current answers while recording (faster); the probe "
                        "policy then stays uncalibrated")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry name, Hugging Face folder or .gguf file "
                                                 "(default: qwen2.5-coder-0.5b)")
    _compute_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests in flight (waiting or running) before new ones get 429 (default 64)")
    p.add_argument("--kv-budget", type=_size, default=None,
                   help="bytes for the KV block pool, e.g. 2G or 512M (default: 1/4 of free memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    _evict_arg(p)
    p.add_argument("--max-rows", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--max-solve-tokens", type=int, default=1 << 20,
                   help="the most tokens one /v1/solve may ask to decode: branches x max_tokens, times the "
                        "nodes a tree adds (default 1048576); a larger request gets 400")
    p.add_argument("--api-key", default=None,
                   help="every endpoint but /health then needs 'Authorization: Bearer KEY' "
                        "(default: $RKSC_API_KEY; none: no key asked)")
    _asks_args(p)


def cmd_serve(args) -> int:
    from rksc.models.loader import resolve
    from rksc.models.registry import DEFAULT_MODEL
    from rksc.server.config import ServerConfig, bind

    config = ServerConfig(model=args.model, dtype=args.dtype, weights=args.weights, threads=args.threads,
                          host=args.host, port=args.port,
                          max_queue=args.max_queue, kv_budget=args.kv_budget, block_size=args.block_size,
                          evict=args.evict, max_rows=args.max_rows, max_solve_tokens=args.max_solve_tokens,
                          asks=args.asks, asks_tau=args.asks_tau,
                          asks_recompute=args.asks_recompute,
                          api_key=os.environ.get("RKSC_API_KEY") or None if args.api_key is None else args.api_key)
    resolve(config.model or DEFAULT_MODEL)  # an unknown or damaged model is a one-line error before listening
    from rksc.kernels.machine import probe
    from rksc.models.compute import choose

    choose(probe(), config.dtype, config.weights)  # so is a dtype or weight format this machine cannot run
    _check_asks(config.model, config.asks, config.asks_tau)
    sock = bind(config.host, config.port)
    _quiet_transformers()
    from rksc.server.app import serve

    return serve(config, sock)


def _bench_args(p: argparse.ArgumentParser) -> None:
    from rksc.bench.conditions import CONDITIONS, DEFAULT_CONDITIONS
    from rksc.bench.datasets import DATASETS

    p.add_argument("--model", default=None, help="registry name, Hugging Face folder or .gguf file")
    _compute_args(p)
    _backend_args(p)
    p.add_argument("--dataset", default="gsm8k", choices=DATASETS)
    p.add_argument("--offset", type=int, default=0, help="first problem (deterministic file order)")
    p.add_argument("--limit", type=int, default=10, help="number of problems")
    p.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                   help=f"comma-separated, from {', '.join(CONDITIONS)}")
    p.add_argument("--regime", default="paper", choices=("paper", "natural"),
                   help="paper: prefix padded to --prefix-tokens, 32 new tokens; natural: no padding, 512")
    p.add_argument("--prefix-tokens", type=int, default=None, help="paper regime prefix length (1024)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=None)
    p.add_argument("--branches", "-b", type=int, default=8)
    p.add_argument("--select", default="composite")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default runs/bench-<model>-<dataset>-<regime>)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--concurrency", "-k", type=int, default=1,
                   help="problems in flight for the engine conditions (rksc, kv-only); the baselines always "
                        "run one problem at a time; with K > 1 conditions interleave per block of 2K problems")
    p.add_argument("--warm-index", action="store_true",
                   help="let the pool's prefix index keep blocks across runs (default: every run starts cold, "
                        "so no condition reuses KV computed by another)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; with --ray: "
                                                              "per worker, default all of its node's cores)")
    p.add_argument("--workload", default="standard", choices=("standard", "diverse"),
                   help="standard: one problem prefix shared by the branches; diverse: each branch its own "
                        "instruction before the problem (compare rksc, asks and nokv)")
    _thresholds_arg(p)
    _asks_args(p, switch=False)
    _ray_args(p)


def cmd_bench(args) -> int:
    from rksc.bench.harness import BenchConfig, machine, run_bench
    from rksc.bench.summary import print_summary
    from rksc.bench.plots import write_plots
    from rksc.models.registry import DEFAULT_MODEL

    require_extra("bench")
    _check_ray(args)
    model = args.model or DEFAULT_MODEL
    out = args.out or f"runs/bench-{Path(model).name}-{args.dataset}-{args.regime}"
    validate.output_dir(out)
    validate.thread_count(args.threads)
    config = BenchConfig(model=model, dtype=args.dtype, weights=args.weights, dataset=args.dataset,
                         offset=args.offset,
                         limit=args.limit, conditions=tuple(c.strip() for c in args.conditions.split(",") if c.strip()),
                         regime=args.regime, prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
                         branches=args.branches, select=args.select, warmup=args.warmup, out=out, plots=args.plots,
                         warm_index=args.warm_index, concurrency=args.concurrency, workload=args.workload,
                         asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                         thresholds=check_thresholds(args.thresholds) if args.thresholds is not None else None)
    from rksc.bench.conditions import CONDITIONS

    if any(CONDITIONS[c].asks for c in config.conditions):
        _check_asks(model, "on", config.asks_tau)
    if args.backend:
        if args.ray is not None:
            raise RkscError("bench --backend runs on the server's batching; drop --ray")
        local = [c for c in config.conditions if CONDITIONS[c].backend != "pool" or "layers" in CONDITIONS[c].early_stop]
        if local:
            raise RkscError(f"conditions {','.join(local)} need the local model; with --backend run engine "
                            "conditions only (e.g. --conditions rksc,cgee)")
        _quiet_transformers()
        solver = _open_solver(dict(model=model, backend=args.backend, backend_model=args.backend_model,
                                   api_key=args.api_key or os.environ.get("OPENAI_API_KEY")))
        summary = run_bench(config, solver)
        summary["backend"] = {"url": solver.engine.base_url, **vars(solver.engine.features)}
        summary["machine"] = machine()
    elif args.ray is not None:
        summary = _bench_on_ray(config, args)
    else:
        from rksc.reasoning.solver import Solver

        _quiet_transformers()
        summary = run_bench(config, solver=Solver.load(model, args.dtype, threads=args.threads,
                                                       weights=args.weights)
                            if args.threads else None)
        summary["machine"] = machine()
    summary["command"] = "rksc " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("rksc") else None
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    if config.plots:
        records = [json.loads(line) for line in Path(out, "results.jsonl").read_text().splitlines()]
        write_plots(records, summary, Path(out))
    print_summary(summary)
    if "cluster" in summary:
        c = summary["cluster"]
        print(f"cluster: {c['describe']}; {c['wall_s']:.1f} s on the driver for {summary['problems']} problems x "
              f"{len(summary['per_condition'])} conditions (after {c['start_s']:.1f} s starting the workers); "
              f"each shard ran every condition in turn: "
              + ", ".join(f"{s['offset']}+{s['limit']}: {sum(s['walls'].values()):.1f} s" for s in summary["runs"]))
    print(f"results: {out}/results.jsonl, {out}/summary.json" + (", plots: *.png" if config.plots else ""))
    return 0


def _bench_on_ray(config, args) -> dict:
    """The harness on one contiguous shard per Ray worker, pooled as one run; each shard is also
    kept in <out>/shard-<k>. The pooled walls are the shards' summed (one worker's time); the
    cluster's own is the driver's elapsed time."""
    import time
    from dataclasses import asdict

    from rksc.bench.combine import combine, save_run
    from rksc.cluster.ray import Workers

    t = time.perf_counter()
    workers = Workers.start(args.ray or None, dict(model=config.model, dtype=config.dtype, weights=config.weights,
                                                   threads=args.threads),
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
    for k, run in enumerate(runs):
        names.append(str(Path(config.out, f"shard-{k}")))
        save_run(names[-1], run)
    summary, records, traces = combine(runs, names)
    summary["config"] = asdict(config)
    summary["cluster"] = {"describe": describe, "workers": len(runs), "wall_s": wall, "start_s": start_s,
                          "address": args.ray or None}
    save_run(config.out, (summary, records, traces))
    return summary


def cmd_calibrate(args) -> int:
    from rksc.bench import calibrate
    from rksc.models.registry import DEFAULT_MODEL

    require_extra("calibrate")
    model = args.model or DEFAULT_MODEL
    offset, limit = calibrate.SPLITS.get(args.dataset, (None, None))
    if args.split is not None:
        if args.offset is not None or args.limit is not None:
            raise RkscError("give either --split or --offset/--limit, not both")
        first, sep, last = args.split.partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(last) < int(first):
            raise RkscError(f"--split takes FIRST-LAST problem indices (e.g. 1019-1318), not {args.split!r}")
        offset, limit = int(first), int(last) - int(first) + 1
    offset = args.offset if args.offset is not None else offset
    limit = args.limit if args.limit is not None else limit
    if offset is None or limit is None:
        raise RkscError(f"no default calibration split for {args.dataset}: give --offset and --limit")
    validate.integer("offset", offset, 0)
    validate.integer("limit", limit, 1)
    validate.integer("concurrency", args.concurrency, 1, validate.MAX_CONCURRENCY)
    validate.number("target", args.target, above=0, maximum=1)
    out = Path(args.out or f"runs/calibrate-{Path(model).name}-{args.dataset}")
    validate.output_dir(str(out))
    if args.order_from is not None:
        if not (Path(args.order_from) / "meta.json").is_file():
            raise RkscError(f"--order-from {args.order_from}: not an `rksc calibrate` folder (no meta.json)")
        if Path(args.order_from).resolve() == out.resolve():
            raise RkscError(f"--order-from and --out are both {out}: record this split in a folder of its own (--out)")
    if args.profile is not None:  # checked now, not after an hour of recording
        validate.output_dir(str(Path(args.profile).parent), "--profile")
    _quiet_transformers()
    report = calibrate.run(model, args.dtype, args.dataset, offset, limit, args.branches, args.max_new_tokens,
                           args.select, args.concurrency, args.target, out, args.profile, args.record_only,
                           args.layers, Path(args.order_from) if args.order_from else None, args.probes,
                           weights=args.weights)
    if report is not None:
        calibrate.print_report(report)
    return 0


def _config(args):
    from rksc.reasoning.solver import SolveConfig

    return SolveConfig(branches=args.branches, max_new_tokens=args.max_new_tokens, select=args.select,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, hints=args.hints,
                       verify=args.verify, cache=args.cache, depth=args.depth, keep=args.keep,
                       verifier=args.verifier, answer_format=args.answer_format,
                       early_stop=check_policies(args.early_stop), layout=args.layout, asks=args.asks,
                       asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                       thresholds=check_thresholds(args.thresholds) if args.thresholds is not None else None)


def cmd_solve(args) -> int:
    from rksc.reasoning.solver import solver_args

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
    config = _config(args)  # validate before the (slow) model load
    _check_asks(args.model, config.asks, config.asks_tau)
    if args.ray is not None and config.cache != "pool":
        raise RkscError("--ray runs on the block pool (--cache pool)")
    _check_ray(args)
    problems = _read_problems(args.file) if args.file else None
    results = None
    if args.out:
        from rksc.models.loader import display_name
        from rksc.models.registry import DEFAULT_MODEL
        from rksc.results import ResultsFile

        validate.output_file(args.out, "--out", input_path=args.file)
        results = ResultsFile(args.out, problems, config, display_name(args.model or DEFAULT_MODEL))
    solver_args(args.threads, args.kv_budget, args.block_size, args.evict)
    if args.backend and config.cache != "pool":
        raise RkscError(f"--cache {config.cache} is a local baseline; --backend runs the engine path (--cache pool)")
    solver_kwargs = dict(model=args.model, dtype=args.dtype, weights=args.weights, threads=args.threads,
                         kv_budget=args.kv_budget,
                         block_size=args.block_size, evict=args.evict)
    if args.backend:  # the model is on the server: its tokenizer here, no weights
        solver_kwargs = dict(model=args.model, backend=args.backend, backend_model=args.backend_model,
                             api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    if problems is not None:
        return _solve_file(solver_kwargs, config, problems, args, results)
    from rksc.report import print_result

    _quiet_transformers()
    result = _open_solver(solver_kwargs).solve(args.question, config)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_result(result)
    return 0


def _read_problems(path: str) -> list[tuple[int, dict | None, str | None]]:
    """(line number, problem or None, error or None) for every non-blank line. A line that cannot
    be used (not UTF-8, not JSON, too deeply nested, no question) carries its error and the rest
    still run; only a file that cannot be read at all, or holds no lines, is an error here."""
    validate.text("--file", path)
    file = Path(path)
    try:
        if not file.is_file():
            raise RkscError(f"file not found: {path}" if not file.exists() else f"--file {path} is not a file")
        data = file.read_bytes()
    except OSError as e:
        raise RkscError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        parsed = parse_problem_line(raw)
        if parsed is not None:
            rows.append((n, *parsed))
    if not rows:
        raise RkscError(f"{path} holds no problems")
    return rows


def parse_problem_line(raw: bytes) -> tuple[dict | None, str | None] | None:
    """One JSONL line -> (problem, None) or (None, why it is unusable); None for a blank line."""
    raw = raw.removesuffix(b"\r")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "not valid JSON here (nested too deeply)"
    except ValueError as e:  # e.g. an integer longer than Python converts (4300 digits)
        return None, f"not valid JSON here ({str(e).split(';')[0][:120]})"
    if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
        return None, 'expected an object with a non-empty "question" string'
    try:
        validate.text("question", item["question"])
    except RkscError as e:
        return None, str(e)
    return item, None


def _gold(item: dict) -> str | None:
    from rksc.reasoning.answers import gsm8k_gold

    gold = item.get("answer", item.get("gold"))
    if gold is None:
        return None
    gold = str(gold)
    if "####" in gold:  # a full GSM8K solution: the answer follows '####'
        return gsm8k_gold(gold) or gold
    return gold


def _solve_file(solver_kwargs: dict, config, problems, args, results) -> int:
    """Solve the lines of a --file (those not already in a resumed --out) and write one record per
    line in input order; on one engine here, or on Ray workers with --ray."""
    from tqdm import tqdm

    from rksc.reasoning.solver import default_concurrency

    earlier = results.done if results is not None else {}
    todo = [row for row in problems if row[0] not in earlier]
    if earlier:
        print(f"rksc: {args.out} already holds results for {len(earlier)} of {len(problems)} lines; "
              f"solving the other {len(todo)}", file=sys.stderr)
    good = [(n, item) for n, item, error in todo if item is not None]
    items = [{"question": item["question"], "gold": _gold(item)} for _, item in good]
    concurrency = args.concurrency or default_concurrency(config)
    source = _engine(solver_kwargs, args) if items else None  # nothing to solve: no model to load
    if source is None:
        pending = iter(())
    elif config.cache == "pool":
        pending = source.solve_many(items, config, concurrency)
    else:  # the baselines solve one problem at a time
        pending = enumerate(_solve_or_error(source, item, config) for item in items)
    write = results.open().write if results is not None else _print_record
    bad = 0
    scored = sum(c is not None for c in earlier.values())
    correct = sum(bool(c) for c in earlier.values())
    bar = tqdm(total=len(problems), initial=len(earlier), desc="solve", unit="problem", file=sys.stderr)
    try:
        for n, item, error in todo:  # input order: each line waits for the problems before it
            if item is not None:
                _, result = next(pending)
                if isinstance(result, RkscError):
                    error = str(result)
                else:
                    record = {"line": n, "id": item.get("id"), **result.to_dict()}
                    scored += result.correct is not None
                    correct += bool(result.correct)
            if error is not None:
                bad += 1
                tqdm.write(f"rksc: {args.file}:{n}: {error}", file=sys.stderr)
                record = {"line": n, "error": error}
            write(record)
            bar.update()
        hit, queried = _prefix_stats(source) if source is not None and config.cache == "pool" else (0, 0)
    finally:
        bar.close()
        if results is not None:
            results.close()
        if args.ray is not None and source is not None:
            source.close()
    summary = f"solved {len(problems) - bad} of {len(problems)} problems"
    if earlier:
        summary += f" ({len(earlier)} in an earlier run)"
    if config.cache == "pool" and items:
        if args.ray is not None:
            summary += f" ({source.describe()}, {source.in_flight(concurrency, len(items))} in flight each)"
        else:
            summary += f" ({min(concurrency, len(items))} in flight)"
    if queried:
        summary += f"; prefix index reused {hit} of {queried} prompt tokens ({hit / queried:.0%})"
    if scored:
        summary += f"; accuracy {correct}/{scored} = {correct / scored:.1%}"
    if bad:
        summary += f"; {bad} bad line(s) reported above"
    print(summary + (f"; results in {args.out}" if args.out else ""), file=sys.stderr)
    return 2 if bad else 0


def _engine(solver_kwargs: dict, args):
    """A Solver here, or with --ray the Workers of a Ray cluster (both solve_many alike)."""
    if args.ray is not None:
        from rksc.cluster.ray import Workers

        return Workers.start(args.ray or None, solver_kwargs, args.ray_workers)
    _quiet_transformers()
    return _open_solver(solver_kwargs)


def _prefix_stats(source) -> tuple[int, int]:
    if hasattr(source, "prefix_stats"):  # Ray workers: summed over their engines
        return source.prefix_stats()
    if source.remote:  # the prefix cache is the server's
        return 0, 0
    stats = source.engine.pool.stats
    return stats.hit_tokens, stats.queried_tokens


def _print_record(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _solve_or_error(solver, item: dict, config):
    try:
        return solver.solve(item["question"], config, gold=item["gold"])
    except RkscError as e:
        return e


def cmd_info(args) -> int:
    from rksc.kernels.machine import probe
    from rksc.models import compute
    from rksc.report import print_info

    here = probe()
    chosen = compute.choose(here, args.dtype, args.weights)  # a choice this machine cannot run: one line, exit 2
    info = {"machine": here.describe(), "asked": {"dtype": args.dtype, "weights": args.weights},
            "chosen": chosen.describe(), "formats": compute.formats(here),
            "timings": compute.measure(here) if args.measure else None}
    if args.json:
        print(json.dumps(info))
    else:
        print_info(info)
    return 0


def cmd_models(args) -> int:
    from rksc.models import pull, registry
    from rksc.report import print_models

    if args.models_command == "list":
        print_models()
        return 0
    if args.models_command == "verify":
        return _verify_model(args.name)
    registry.recipe(args.name)
    path = pull.prepare(args.name, progress=True, force=args.force)
    print(f"{args.name} ready at {path}")
    if args.keep_gguf:
        print(f"{args.name} source GGUF at {pull.ensure_gguf(args.name)}")
    return 0


def _verify_model(name: str) -> int:
    from rksc.models import pull, registry

    state, files = pull.verify(name)
    size = registry.dir_size(registry.model_dir(name))
    note = "" if state.recorded else " (recorded now: it was prepared by an older rksc, without a file record)"
    print(f"{name}: {files} files match their sha256 ({size / 2**20:.1f} MB){note}")
    return 0


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _exit_on_interrupt() -> None:
    """Ctrl-C ends solve, bench and calibrate at once with the one line and 130. Raised as a
    KeyboardInterrupt it could land inside transformers' lazy imports or the model load, which
    turn it into other errors or swallow it. Every output line is written whole and flushed
    (a resumed calibration or bench skips a cut line), so ending here loses no finished result."""
    import signal

    def stop(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        print("rksc: interrupted", file=sys.stderr, flush=True)
        if "ray" in sys.modules:  # --ray
            from rksc.cluster.ray import disconnect

            disconnect()
        os._exit(130)

    signal.signal(signal.SIGINT, stop)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if argv is None and args.command in ("solve", "bench", "calibrate", "asks-curve"):
            _exit_on_interrupt()
        handler = {"solve": cmd_solve, "models": cmd_models, "bench": cmd_bench,
                   "calibrate": cmd_calibrate, "serve": cmd_serve, "asks-curve": cmd_asks_curve,
                   "info": cmd_info}[args.command]
        code = handler(args)
        sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
        return code
    except RkscError as e:
        print(f"rksc: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rksc: interrupted", file=sys.stderr)
        if argv is None:  # the command line: end now. Interpreter shutdown can meet the interrupt again
            # (threads of the model load, atexit hooks) and die of SIGINT instead of exiting with 130;
            # every file was closed while the exception unwound, so nothing written is lost.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(130)
        return 130
    except BrokenPipeError:  # `rksc ... | head`: the reader has what it wanted; end quietly
        _stdout_to_devnull()
        return 0
    except SystemExit as e:  # rich handles a broken pipe itself with exit 1: same quiet end as above
        if isinstance(e.__context__, BrokenPipeError):
            return 0
        raise


def _one_line(text: str) -> str:
    """Messages quote user input; escape what would break the line or the terminal (\\r, \\n, ...)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so Python's final flush of the unread rest does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
