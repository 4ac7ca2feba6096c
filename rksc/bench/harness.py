"""`rksc bench`: conditions run side by side on the same problems, interleaved per problem.

Writes <out>/results.jsonl (one record per problem and condition), <out>/summary.json
(rksc.bench.summary) and PNG plots, and prints a table. Regimes: `paper` pads the shared prefix
with neutral filler to --prefix-tokens (default 1024) and generates 32 tokens; `natural` adds no
filler and generates 512.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rksc import validate
from rksc.bench import workloads
from rksc.bench.conditions import CONDITIONS, DEFAULT_CONDITIONS, check_names, schedule
from rksc.bench.datasets import DATASETS, Problem, load_problems
from rksc.bench.naive import HFGenerateBaseline
from rksc.bench.replay import evaluate, trace_of
from rksc.bench.summary import summarize
from rksc.errors import RkscError
from rksc.kernels.machine import probe
from rksc.models.registry import DEFAULT_MODEL
from rksc.reasoning import early
from rksc.reasoning.select import METHODS
from rksc.reasoning.config import SolveConfig
from rksc.reasoning.solver import Solver

REGIMES = {"paper": (1024, 32), "natural": (0, 512)}  # prefix tokens, new tokens
MAX_PREFIX_TOKENS = 1 << 17  # padding; longer than any supported model's context
FILLER = (
    "Background notes for the reader. The town library opens at nine in the morning and closes at six "
    "in the evening. Its reading room has long oak tables, green lamps and tall windows that face a quiet "
    "garden. Visitors are asked to speak softly, to return books to the cart near the door, and to leave "
    "umbrellas in the stand by the entrance. The library keeps newspapers from several cities, a shelf of "
    "atlases, and a small collection of old maps that can be viewed on request. On the first floor there is "
    "a room for children with picture books and a carpet shaped like a pond. These notes describe the "
    "setting only and have nothing to do with the problem below. "
)


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # rksc.models.compute
    weights: str = "auto"
    dataset: str = "gsm8k"
    offset: int = 0
    limit: int = 10
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    regime: str = "paper"
    prefix_tokens: int | None = None  # None: the regime's default
    max_new_tokens: int | None = None
    branches: int = 8
    select: str = "composite"
    warmup: int = 1
    resamples: int = 2000
    out: str = "runs/bench"
    plots: bool = True
    warm_index: bool = False  # True: the pool's prefix index keeps blocks across runs (cross-request reuse)
    concurrency: int = 1  # problems in flight for engine conditions (rksc, kv-only); baselines run one at a time
    workload: str = "standard"  # how each branch's prompt is written around the problem (rksc.bench.workloads)
    asks_tau: float | None = None  # the asks condition's tau (None: the model's ASKS calibration)
    asks_recompute: float | None = None
    thresholds: dict | None = None  # early-exit thresholds set by hand over the profile's (uncalibrated)

    def __post_init__(self):
        _check_fields(self)
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", early.check_thresholds(self.thresholds))
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        checks = [
            (not unknown, f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}"),
            (len(set(self.conditions)) == len(self.conditions) and self.conditions, "conditions must be distinct"),
            (self.dataset in DATASETS, f"unknown dataset '{self.dataset}'; choose from {', '.join(DATASETS)}"),
            (self.regime in REGIMES, f"unknown regime '{self.regime}'; choose paper or natural"),
            (self.limit >= 1 and self.offset >= 0, "limit must be >= 1 and offset >= 0"),
            (self.branches >= 1, "branches must be at least 1"),
            (self.select in METHODS, f"select must be one of {', '.join(METHODS)}"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.workload in workloads.WORKLOADS, f"workload must be one of {', '.join(workloads.WORKLOADS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RkscError(message)

    @property
    def target_prefix(self) -> int:
        return REGIMES[self.regime][0] if self.prefix_tokens is None else self.prefix_tokens

    @property
    def new_tokens(self) -> int:
        return REGIMES[self.regime][1] if self.max_new_tokens is None else self.max_new_tokens


def _check_fields(c: BenchConfig) -> None:
    """Types and ranges of the fields; __post_init__ then checks names against the known datasets,
    conditions and regimes."""
    validate.text("model", c.model)
    validate.dtype(c.dtype)
    validate.weights(c.weights)
    for name in ("dataset", "regime", "select"):
        if not isinstance(getattr(c, name), str):
            raise RkscError(f"{name} must be a string (got {validate.show(getattr(c, name))})")
    check_names(c.conditions)
    validate.integer("offset", c.offset, 0)
    validate.integer("limit", c.limit, 1)
    validate.optional_integer("prefix_tokens", c.prefix_tokens, 0, MAX_PREFIX_TOKENS)
    validate.optional_integer("max_new_tokens", c.max_new_tokens, 1)
    validate.integer("branches", c.branches, 1, validate.MAX_BRANCHES)
    validate.integer("warmup", c.warmup, 0)
    validate.integer("resamples", c.resamples, 1)
    validate.text("out", c.out)
    validate.boolean("plots", c.plots)
    validate.boolean("warm_index", c.warm_index)
    validate.integer("concurrency", c.concurrency, 1, validate.MAX_CONCURRENCY)


class PeakRSS:
    """Peak resident memory of this process while the block runs (polls /proc every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    return validate.resident_memory() or 0


def machine() -> dict:
    """This machine as benchmarks record it: CPU, its kind, flags and kernels (rksc.kernels.machine)."""
    import platform

    import torch

    return {**probe().describe(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def filler_for(solver: Solver, question: str, target: int) -> str:
    """Neutral text that brings the shared prefix to about `target` tokens (paper regime)."""
    base = len(solver.prompts.layout(question).prefix.ids)
    need = target - base
    if need <= 0:
        return ""
    tok = solver.lm.tokenizer
    stream = tok(FILLER * (need // 100 + 2), add_special_tokens=False)["input_ids"]
    text = tok.decode(stream[:need - 2]) + "\n\n"
    return text


def branch_contexts(solver: Solver, problems: list[Problem], workload: str, offset: int, branches: int,
                    prefix_tokens: int) -> list[str | list[dict]]:
    """What goes before each problem: filler up to `prefix_tokens` (paper regime), and for the
    workloads that give each branch its own context, that context after it (problem `offset + i`'s)."""
    fillers = [filler_for(solver, p.question, prefix_tokens) for p in problems]
    if workload not in workloads.CONTEXTS:
        return fillers
    examples = workloads.pool()
    return [[{**c, "preamble": filler + c["preamble"]}
             for c in workloads.contexts(workload, offset + i, branches, examples)]
            for i, filler in enumerate(fillers)]


def make_baselines(solver: Solver) -> dict:
    """The one-at-a-time baselines; engine conditions ("pool") have none: they run on solver.engine."""
    return {"naive": HFGenerateBaseline(solver.lm.model, solver.verifier, solver.eos, solver.runner.pad_id),
            "pool": None, **solver.baselines}


def record(r, rss: int) -> dict:
    return {
        "latency_s": r.timing.total_s, "prefill_s": r.timing.prefill_s, "decode_s": r.timing.decode_s,
        "verify_s": r.timing.verify_s, "new_tokens": r.timing.new_tokens, "tok_s": r.timing.decode_tok_s,
        "answer": r.answer, "gold": r.gold, "correct": r.correct, "chosen": r.chosen,
        "prefix_tokens": r.prefix_tokens, "kv_bytes": r.kv_bytes, "peak_rss_bytes": rss,
        "branch_answers": [b.answer for b in r.branches], "verifier": [b.verifier for b in r.branches],
        "stop_reasons": [b.stop_reason for b in r.branches],
        "branch_tokens": [b.tokens for b in r.branches],
        "steps": max((b.tokens for b in r.branches), default=0),  # decode steps of the longest branch
        "verify_calls": sum(b.verifier is not None for b in r.branches),
        "early": r.early,  # what early exit did (engine conditions; None elsewhere)
        "asks": r.kv_bytes.get("asks"),  # per branch prompt, what approximate reuse did (asks only)
    }


def check_calibration(solver: Solver, config: BenchConfig, problems: list[Problem], conditions: list[str]):
    """The profile the early-exit conditions use; refuses to evaluate it on its own calibration split."""
    uses = {n for c in conditions for n in CONDITIONS[c].early_stop}
    if not uses:
        return None
    profile = solver.profile
    if profile is None:  # the policies need thresholds set by hand: Solver.early_settings says which
        return None
    cal = profile.calibration
    order = cal.get("order") if isinstance(cal.get("order"), dict) else {}
    splits = [s for s in (cal.get("split"), order.get("split")) if s]  # the split that confirms, the one that orders
    for low, high in splits if cal.get("dataset") == config.dataset else []:
        overlap = [p.id for i, p in enumerate(problems) if low <= config.offset + i <= high]
        if overlap:
            raise RkscError(f"problems {config.offset}-{config.offset + len(problems) - 1} overlap the calibration split "
                            f"{low}-{high} of {config.dataset} ({len(overlap)} problems); evaluate on other problems")
    return profile


def run_one(solver: Solver, baseline, problem: Problem, config: SolveConfig, context: str | list[dict]) -> dict:
    with PeakRSS() as rss:
        r = solver.solve(problem.question, config, gold=problem.gold, baseline=baseline, context=context,
                         answer_format=problem.kind)
    return record(r, rss.peak)


def run_many(solver: Solver, problems: list[Problem], config: SolveConfig, contexts: list[str | list[dict]],
             concurrency: int) -> tuple[list[dict], float]:
    """Problems on the engine with `concurrency` in flight; their records and the wall time."""
    items = [{"question": p.question, "gold": p.gold, "context": c, "answer_format": p.kind}
             for p, c in zip(problems, contexts)]
    t = time.perf_counter()
    with PeakRSS() as rss:
        results = [r for _, r in solver.solve_many(items, config, concurrency)]
    wall = time.perf_counter() - t
    for r in results:
        if isinstance(r, RkscError):
            raise r
    return [record(r, rss.peak) for r in results], wall, results


def run_bench(config: BenchConfig, solver: Solver | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    validate.output_dir(config.out)  # before the slow part: data download, model load
    problems = load_problems(config.dataset, config.offset, config.limit, progress=progress)
    runnable = [c for c in config.conditions if CONDITIONS[c].available]
    unavailable = {c: f"needs {', '.join(CONDITIONS[c].missing)} (not built)"
                   for c in config.conditions if not CONDITIONS[c].available}
    if not runnable:
        raise RkscError("none of the chosen conditions can run in this build: "
                        + "; ".join(f"{c} {why}" for c, why in unavailable.items()))
    solver = solver or Solver.load(config.model, config.dtype, weights=config.weights)
    baselines = {} if solver.remote else make_baselines(solver)  # a remote backend runs engine conditions only
    solve_config = SolveConfig(branches=config.branches, max_new_tokens=config.new_tokens, select=config.select,
                               layout="diverse" if config.workload == "diverse" else "shared",
                               asks_tau=config.asks_tau, asks_recompute=config.asks_recompute,
                               thresholds=config.thresholds)
    if any(CONDITIONS[c].asks for c in runnable):  # a missing calibration is an error now, not after the baselines
        solver.asks_settings(replace(solve_config, asks="on"))
    profile = check_calibration(solver, config, problems, runnable)
    for c in runnable:  # so are early-exit policies without calibrated (or hand-set) thresholds
        solver.early_settings(replace(solve_config, early_stop=CONDITIONS[c].early_stop))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    # warm-up on problems outside the measured set, every condition once, not recorded
    for w in range(config.warmup):
        q = f"Warm-up {w}: a box holds {w + 3} red and {w + 4} blue balls. How many balls are in the box?"
        for c in runnable:
            solver.solve(q, solve_config, baseline=baselines[CONDITIONS[c].path], max_new_tokens=4)

    contexts = branch_contexts(solver, problems, config.workload, config.offset, config.branches,
                               config.target_prefix)
    # one problem at a time: interleaved per problem; with problems in flight, per block of 2K problems
    size = 1 if config.concurrency == 1 else 2 * config.concurrency
    records, walls = [], {c: 0.0 for c in runnable}
    # with early exit in the run, the full runs of `rksc` are also replayed under each policy (the
    # disagreement that policy alone causes, free of bf16 batch-composition noise); every engine
    # condition then records token confidences, so they all pay the same small cost
    early_conditions = [c for c in runnable if CONDITIONS[c].early_stop]
    replay = bool(early_conditions) and "rksc" in runnable
    solver.track_confidence = replay
    traces = []
    with open(out / "results.jsonl", "w") as f:
        for idx, c in tqdm(schedule(len(problems), runnable, size), desc="bench", unit="block" if size > 1 else "run",
                           disable=not progress, file=sys.stderr):
            cond = CONDITIONS[c]
            if not config.warm_index:
                # every run starts cold: no condition may reuse KV that another run computed
                solver.engine.drop_cached()
            config_c = replace(solve_config, cache="pool" if cond.path == "pool" else "shared",
                               verifier=cond.verifier, early_stop=cond.early_stop, asks="on" if cond.asks else "off")
            if cond.path == "pool":
                recs, wall, results = run_many(solver, [problems[i] for i in idx], config_c,
                                               [contexts[i] for i in idx], config.concurrency)
                if replay and c == "rksc":
                    traces += [trace_of(r, i, problems[i].id) for i, r in zip(idx, results)]
            else:
                recs = [run_one(solver, baselines[cond.path], problems[i], config_c, contexts[i]) for i in idx]
                wall = sum(r["latency_s"] for r in recs)
            walls[c] += wall
            for i, rec in zip(idx, recs):
                rec = {"problem": problems[i].id, "index": i, "condition": c, "features": cond.features,
                       "verifier": cond.verifier, "concurrency": config.concurrency if cond.path == "pool" else 1,
                       **rec}
                records.append(rec)
                f.write(json.dumps(rec) + "\n")
            f.flush()
    solver.track_confidence = False
    summary = summarize(records, runnable, config.resamples, walls)
    if replay:
        with open(out / "traces_rksc.jsonl", "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in traces)
        for c in early_conditions:
            names, thresholds = solver.early_settings(replace(solve_config, early_stop=CONDITIONS[c].early_stop))
            # rksc's runs are not probed, nor their verifier layers read (both would slow the baseline)
            if names and not {"probe", "layers"} & set(names):
                s = evaluate(traces, names, thresholds)
                summary["per_condition"][c]["replay_vs_rksc"] = s.to_dict()
    summary.update(config=asdict(config), unavailable=unavailable, model=solver.lm.name,
                   compute=solver.lm.compute.describe() if solver.lm.compute is not None else None,
                   profile=profile.to_dict() if profile is not None else None,
                   problems=len(problems), started=started, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                   conditions_described={c: CONDITIONS[c].description for c in config.conditions},
                   missing_features={c: CONDITIONS[c].missing for c in runnable if CONDITIONS[c].missing})
    return summary
