"""`rksc calibrate`: thresholds for the lossy early-exit policies, fitted on a calibration split.

1. record: full computation (every branch to its end, every branch verified) on the calibration
   problems, keeping per branch its tokens, per-token confidences, answer, stop reason and
   verifier score, the lens margins of its verifier question and the answers probes read from it
   every 64 tokens (probes fork the branch and stop nothing; `traces.jsonl`, resumable: an
   interrupted run continues where it stopped).
2. fit: replay the policies on the recorded runs token by token with the same code the solver
   runs online (rksc.reasoning.early.Monitor); a setting's disagreement is the share of problems
   whose selected answer differs from full computation. The settings are tested in one sequence
   fixed in advance (`path`: round after round every knob one notch more aggressive, each step
   added to the accepted ones before it), starting from `exact`, which is lossless. A step is
   accepted while the one-sided 95% Clopper-Pearson upper bound on the combination's disagreement
   stays at or below the target (default 1%); the first step that fails ends the walk. This is
   fixed-sequence testing (Learn then Test, Angelopoulos et al. 2021): the chosen combination's
   risk is within the target with 95% confidence, which would not hold after picking the best of
   many settings tested on the same problems. With zero disagreements the bound is 1 - 0.05^(1/n):
   reaching 1% needs n >= 299 problems.

Never calibrate on the problems you evaluate on: the default split of GSM8K is its last 300 test
problems (1019-1318), and `rksc bench` refuses to evaluate a calibrated policy on them.

This module records the runs and saves the profile; replaying and fitting are rksc.bench.replay.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rksc.bench.datasets import load_problems
from rksc.bench.replay import (done_indices, find_traces, fit, knobs, load_traces, ordered_path,
                               trace_of)
from rksc.engine.driver import run_programs
from rksc.engine.sequence import LayerExit, Sequence
from rksc.errors import RkscError
from rksc.reasoning import early, profiles
from rksc.reasoning.config import SolveConfig
from rksc.reasoning.solver import Solver

SPLITS = {"gsm8k": (1019, 300)}  # dataset -> default calibration split (offset, limit)


def run(model: str, dtype: str, dataset: str, offset: int, limit: int, branches: int, max_new_tokens: int,
        select_method: str, concurrency: int, target: float, out: Path, profile_path: str | None,
        record_only: bool = False, layers: bool = True, order_from: Path | None = None,
        probes: bool = True, weights: str = "auto") -> dict | None:
    """Record (resuming) and fit; saves fit.json and the profile. Returns the fit report."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    traces_path = out / "traces.jsonl"
    problems = load_problems(dataset, offset, limit, progress=True)
    done = done_indices(traces_path)
    todo = [i for i in range(len(problems)) if offset + i not in done]
    config = SolveConfig(branches=branches, max_new_tokens=max_new_tokens, select=select_method)
    solver = Solver.load(model, dtype, weights=weights)
    meta = {"model": solver.lm.name, "dtype": solver.lm.dtype, "compute": solver.lm.compute.describe(),
            "machine": solver.lm.machine.describe(), "dataset": dataset, "offset": offset, "limit": limit,
            "branches": branches, "max_new_tokens": max_new_tokens, "select": select_method,
            "problems": [p.id for p in problems], "probe_every": early.Thresholds().every if probes else None}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    if todo:
        solver.track_confidence = solver.record_margins = True
        solver.record_probes = probes  # every branch probed every 64 tokens, nothing stopped: the probe policy's replay
        items = [{"question": problems[i].question, "gold": problems[i].gold, "answer_format": problems[i].kind}
                 for i in todo]
        t = time.perf_counter()
        with open(traces_path, "a") as f, tqdm(total=len(todo), desc="record (full computation)", unit="problem",
                                                file=sys.stderr) as bar:
            for j, result in solver.solve_many(items, config, concurrency):
                i = todo[j]
                if isinstance(result, RkscError):
                    print(f"rksc: problem {offset + i}: {result}", file=sys.stderr)
                    continue
                f.write(json.dumps(trace_of(result, offset + i, problems[i].id)) + "\n")
                f.flush()
                bar.update()
        meta["record_s"] = time.perf_counter() - t
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    if record_only:
        return None
    traces = [t for t in load_traces(traces_path) if offset <= t["index"] < offset + limit]  # this split's only
    missing = [t for t in traces if any(b["verifier"] is not None and not b.get("margins") for b in t["branches"])]
    if missing and layers:  # traces recorded before margins were kept: ask the verifier questions again, lens on
        by_index = {offset + i: p for i, p in enumerate(problems)}
        with tqdm(total=len(missing), desc="verifier margins", unit="problem", file=sys.stderr) as bar:
            for _ in add_margins(solver, [by_index[t["index"]] for t in missing], missing, config, concurrency):
                bar.update()
        traces_path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    if not layers:
        traces = [dict(t, branches=[{k: v for k, v in b.items() if k != "margins"} for b in t["branches"]])
                  for t in traces]
    return fit_and_save(traces, meta, target, out, profile_path or profiles.path_for(solver.lm.name), order_from)


def order_traces(folder: Path, meta: dict) -> tuple[list[dict], dict]:
    """The recorded runs in another calibration folder, to learn the testing order from: same
    model and settings, no problem in common with this split."""
    other = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else None
    path = find_traces(folder, "traces")
    if other is None or path is None:
        raise RkscError(f"--order-from {folder}: not an `rksc calibrate` folder (meta.json and traces.jsonl)")
    same = ("model", "dataset", "branches", "max_new_tokens", "select")
    differ = [k for k in same if other.get(k) != meta.get(k)]
    if differ:
        raise RkscError(f"--order-from {folder}: recorded with other settings ({', '.join(differ)})")
    if set(other["problems"]) & set(meta["problems"]):
        raise RkscError(f"--order-from {folder}: its problems overlap this split; the order must be learnt elsewhere")
    return load_traces(path), other


def fit_and_save(traces: list[dict], meta: dict, target: float, out: Path, profile_path,
                 order_from: Path | None = None) -> dict:
    """Fit on `traces` (in the order learnt from `order_from`'s runs, if given, else the fixed
    `path`), write fit.json into `out` and the profile to `profile_path`; the report."""
    steps = order = None
    if order_from is not None:
        learn, other = order_traces(Path(order_from), meta)
        steps = ordered_path(learn, target, progress=True)
        order = {"folder": str(order_from), "split": [other["offset"], other["offset"] + other["limit"] - 1],
                 "n": len(learn)}
    report = fit(traces, target, progress=True, steps=steps)
    report["order"] = order or ("fixed in advance (calibrate.path, round after round: "
                                + ", ".join(k for k, (_, v) in knobs(traces).items() if v) + ")")
    report.update(model=meta["model"], dataset=meta["dataset"], split=[meta["offset"], meta["offset"] + meta["limit"] - 1],
                  branches=meta["branches"], max_new_tokens=meta["max_new_tokens"], select=meta["select"],
                  finished_within_cap=finished_share(traces))
    combo = report["combination"]
    thresholds = early.Thresholds.from_dict(combo["thresholds"])
    calibration = {k: report[k] for k in ("dataset", "split", "n", "target", "confidence", "branches",
                                          "max_new_tokens", "select", "method", "order")}
    calibration.update(calibrated=list(combo["policies"]), bound=combo["bound"], disagree=combo["disagree"],
                       steps_saved=combo["steps_saved"], tokens_saved=combo["tokens_saved"],
                       steps_accepted=sum(s["accepted"] for s in report["path"]), steps=report["steps"])
    saved = profiles.save(profiles.Profile(meta["model"], tuple(combo["policies"]), thresholds, calibration),
                          profile_path)
    report["profile"] = str(saved)
    (out / "fit.json").write_text(json.dumps(report, indent=2))
    return report


def add_margins(solver, problems: list, traces: list[dict], config, concurrency: int):
    """Fill each verified branch's "margins" (logit-lens YES/NO margin after every layer) by asking
    its verifier question again on top of its recorded tokens, the lens watching every layer.
    Yields once per problem done."""
    def program(problem, trace):
        laid = solver.problem(problem.question, config)
        prefix = solver.engine.add(Sequence(laid.prefix_ids, hold=True))
        yield [prefix]
        asks = {}
        for i, b in enumerate(trace["branches"]):
            if b["verifier"] is None:
                continue
            ids = laid.prefix_ids + laid.suffix_ids[i] + b["tokens"] + laid.reader.continuation(b["reason"] == "finished")
            asks[i] = solver.engine.add(Sequence(ids, parent=prefix, keep_logits=True, layer_exit=LayerExit(math.inf)))
        solver.engine.release(prefix)
        yield list(asks.values())
        for i, ask in asks.items():
            trace["branches"][i]["margins"] = [round(m, 4) for m in (ask.out.lens.margins if ask.out.lens else [])]
        return trace

    for _, result in run_programs(solver.engine, (program(p, t) for p, t in zip(problems, traces)), concurrency):
        if isinstance(result, Exception):
            raise result
        yield result


def finished_share(traces: list[dict]) -> float:
    """Share of branches that ended on their own within the token cap."""
    reasons = [b["reason"] for t in traces for b in t["branches"]]
    return sum(r == "finished" for r in reasons) / len(reasons) if reasons else 0.0


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"early exit calibrated on {report['dataset']} {report['split'][0]}-{report['split'][1]} "
                    f"({report['n']} problems): fixed-sequence test, each step adds to the ones before, "
                    f"accepted while disagreement <= {report['target']:.1%} (one-sided {report['confidence']:.0%} bound)")
    for col in ("step", "knob", "setting", "disagree", "bound", "steps saved", "tokens saved", "verifier layers saved",
                "probes/problem", "accuracy", "verdict"):
        t.add_column(col, justify="left" if col in ("knob", "setting", "verdict") else "right")

    def row(step: str, knob: str, setting: str, s: dict, verdict: str) -> None:
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.1%}"
        t.add_row(step, knob, setting, f"{s['disagree']}/{s['n']}", f"{s['bound']:.2%}", f"{s['steps_saved']:.1%}",
                  f"{s['tokens_saved']:.1%}", f"{s['layers_saved']:.1%}", f"{s.get('probes', 0):.1f}", acc, verdict)

    row("0", "exact", "-", report["start"], "lossless")
    for i, s in enumerate(report["path"], 1):
        row(str(i), s["knob"], ", ".join(f"{k}={_fmt(v)}" for k, v in s["set"].items()), s,
            "accepted" if s["accepted"] else "rejected: stop")
    combo = report["combination"]
    console = Console(width=None if __import__("sys").stdout.isatty() else 180)
    console.print(t)
    th = {k: v for k, v in combo["thresholds"].items() if k in _shown(combo["policies"])}
    console.print(f"cgee = {'+'.join(combo['policies'])} ({', '.join(f'{k}={_fmt(v)}' for k, v in th.items()) or '-'}): "
                  f"{combo['disagree']}/{combo['n']} answers differ from full computation, bound {combo['bound']:.2%}, "
                  f"{combo['steps_saved']:.1%} of decode steps saved; {len(report['path'])} of {report['steps']} "
                  f"steps tested")
    console.print(f"branches that finished within {report['max_new_tokens']} tokens: "
                  f"{report['finished_within_cap']:.1%}; profile saved to {report['profile']}")


def _shown(names: list[str]) -> set[str]:
    return {f for n in names for f in early.FIELDS.get(n, ())}


def _fmt(v) -> str:
    return "off" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
