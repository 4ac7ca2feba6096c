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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from rksc.reasoning import early
from rksc.reasoning.select import Candidate, select

SPLITS = {"gsm8k": (1019, 300)}  # dataset -> default calibration split (offset, limit)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate after k events in n trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


# ---- record ----

def trace_of(result, index: int, problem_id: str) -> dict:
    """What fitting needs of one full-computation solve."""
    return {
        "index": index, "problem": problem_id, "gold": result.gold, "answer": result.answer,
        "correct": result.correct, "select": result.config.select,
        "probe_every": (result.early or {}).get("probe_every"),  # None: no probes ran
        "branches": [{"tokens": b.token_ids, "confs": [round(c, 4) for c in b.token_confs],
                      "probs": [round(p, 5) for p in b.token_probs], "answer": b.answer, "reason": b.stop_reason,
                      "verifier": b.verifier, "confidence": b.confidence,
                      "margins": [round(m, 4) for m in b.verifier_margins],
                      "probes": [list(p) for p in b.probes]} for b in result.branches],
    }


def done_indices(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    out = set()
    with open(path) as f:
        for line in f:
            try:
                out.add(json.loads(line)["index"])
            except (ValueError, KeyError):
                continue  # a line cut short by an interrupted run is recomputed
    return out


def find_traces(folder: str | Path, *stems: str) -> Path | None:
    """The first of `stem`.jsonl or `stem`.jsonl.gz, per stem in order, that `folder` holds."""
    paths = [Path(folder) / f"{stem}.jsonl{gz}" for stem in stems for gz in ("", ".gz")]
    return next((p for p in paths if p.is_file()), None)


def load_traces(path: str | Path) -> list[dict]:
    """Recorded runs by problem index (a gzipped file, `.gz`, is read as such)."""
    import gzip

    traces = {}
    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
        for line in f:
            try:
                t = json.loads(line)
            except ValueError:
                continue
            traces[t["index"]] = t
    return [traces[i] for i in sorted(traces)]


# ---- replay ----

@dataclass
class Replay:
    answer: str | None  # selected answer
    steps: int  # decode steps until the last branch ended (the solve's length)
    tokens: int  # tokens generated over all branches
    verified: int  # verifier calls
    skipped: bool  # verifier skipped by gate (a)
    probes: int = 0  # probes started (with the probe policy)


def replay(trace: dict, names: tuple[str, ...], thresholds: early.Thresholds) -> Replay:
    """The outcome of running `names` on a recorded full run: branches feed their recorded tokens
    one step at a time; stopped branches keep what they had. Probes are read where the recording
    read them. One approximation: a branch the probe policy stops is a candidate with its probed
    answer, and online the verifier then scores its partial text; replay weighs it with the score
    its full text got (selection by vote, or an answer every candidate shares, does not depend on
    it)."""
    branches = trace["branches"]
    if "layers" in names:  # verifier layer exit: a branch's score is read where its question exits
        branches = [dict(b, verifier=lens_verdict(b, thresholds)[1]) for b in branches]
    select_method = trace["select"]
    monitor = early.Monitor(len(branches), early.build(names, thresholds, select_method))
    verify = any(b["verifier"] is not None for b in branches)
    weighted = verify and select_method != "vote"
    incremental = weighted and "exact" in names
    lengths = [len(b["tokens"]) for b in branches]
    if "probe" in names:
        every = trace.get("probe_every")
        if not every or thresholds.every % every:
            raise ValueError(f"problem {trace['index']}: the probe policy (every {thresholds.every} tokens) needs runs "
                             f"recorded with probes every {thresholds.every} tokens or a divisor of it "
                             f"({'recorded every ' + str(every) if every else 'these were recorded without probes'})")
    reads = [probe_reads(b, thresholds.every) if "probe" in names else [] for b in branches]
    step = 0
    while monitor.live:
        # jump to the next event: a branch ends, a probe is read, or the live branches reach a check point
        nxt = min([lengths[i] for i in monitor.live] + [reads[i][0][1] for i in monitor.live if reads[i]]
                  + [(step // early.CHECK_EVERY + 1) * early.CHECK_EVERY])
        step = max(nxt, step + 1)
        live = monitor.live
        for i in live:
            b, v = branches[i], monitor.views[i]
            n = min(step, lengths[i])
            v.tokens, v.confs, v.probs = b["tokens"][:n], b["confs"][:n], b["probs"][:n]
            if step >= lengths[i]:
                weight = b["verifier"] if incremental else (None if weighted else b["confidence"])
                monitor.end(i, b["reason"], b["answer"], weight)
        for i in live:  # online, a branch's probe read in the step it ends still counts; later ones are cancelled
            while reads[i] and reads[i][0][1] <= step:
                monitor.probed(i, reads[i].pop(0)[2])
        monitor.decide()
    cands = [i for i, v in enumerate(monitor.views) if v.candidate] or list(range(len(branches)))
    skipped = verify and "skip" in names and not incremental and early.skip_verifier(monitor.views, thresholds)
    method = "vote" if skipped else select_method
    answers = [monitor.views[i].answer if monitor.views[i].candidate else branches[i]["answer"] for i in cands]
    scores = [None if skipped else branches[i]["verifier"] for i in cands]
    confs = [branches[i]["confidence"] for i in cands]
    chosen = select([Candidate(a, c, s) for a, c, s in zip(answers, confs, scores)], method)
    tokens = sum(len(v.tokens) for v in monitor.views)
    probes = sum((len(v.tokens) - 1) // thresholds.every for v in monitor.views if v.tokens) if "probe" in names else 0
    return Replay(answers[chosen], step, tokens, 0 if skipped else len(cands), skipped, probes)


def probe_reads(branch: dict, every: int) -> list[list]:
    """The recorded probe reads of a branch that a probe every `every` tokens would have made:
    those started at a multiple of it (the recording probed every `probe_every` tokens, a divisor)."""
    return [list(p) for p in branch.get("probes") or [] if p[0] % every == 0]


def lens_verdict(branch: dict, th: early.Thresholds) -> tuple[int | None, float | None]:
    """(exit layer, score) of a branch's verifier question under the layer-exit thresholds, from
    its recorded lens margins; without an exit the score is the full model's."""
    margins = branch.get("margins") or []
    streak = 0
    for layer, m in enumerate(margins):
        streak = streak + 1 if abs(m) >= th.exit_margin else 0
        if streak >= th.exit_patience and layer >= th.exit_min_layer:
            return layer, 1 / (1 + math.exp(-m))
    return None, branch["verifier"]


def layers_saved(trace: dict, th: early.Thresholds) -> tuple[int, int]:
    """(layers skipped, layers) for the final verification step of a problem: the step stops once
    every question has exited."""
    margins = [b.get("margins") or [] for b in trace["branches"] if b["verifier"] is not None]
    if not margins or not all(margins):
        return 0, 0
    total = len(margins[0])
    exits = [lens_verdict(b, th)[0] for b in trace["branches"] if b["verifier"] is not None]
    if None in exits:
        return 0, total
    return total - (max(exits) + 1), total


@dataclass
class Setting:
    names: tuple[str, ...]
    thresholds: early.Thresholds
    n: int = 0
    disagree: int = 0
    bound: float = 1.0
    steps_saved: float = 0.0  # share of decode steps saved against full computation (summed over problems)
    tokens_saved: float = 0.0
    accuracy: float | None = None
    verify_skipped: int = 0
    layers_saved: float = 0.0  # share of the final verification steps' decoder layers not run
    probes: float = 0.0  # probes started per problem (their cost is not in the savings above)

    def to_dict(self) -> dict:
        return {"policies": list(self.names), "thresholds": self.thresholds.to_dict(), "n": self.n,
                "disagree": self.disagree, "bound": self.bound, "steps_saved": self.steps_saved,
                "tokens_saved": self.tokens_saved, "accuracy": self.accuracy, "verify_skipped": self.verify_skipped,
                "layers_saved": self.layers_saved, "probes": self.probes}


def evaluate(traces: list[dict], names: tuple[str, ...], thresholds: early.Thresholds,
             confidence: float = 0.95) -> Setting:
    from rksc.reasoning.answers import same_answer

    s = Setting(names, thresholds, n=len(traces))
    full_steps = full_tokens = steps = tokens = correct = scored = skipped_layers = layers = 0
    for t in traces:
        if "layers" in names:
            a, b = layers_saved(t, thresholds)
            skipped_layers, layers = skipped_layers + a, layers + b
        r = replay(t, names, thresholds)
        s.disagree += not (r.answer == t["answer"] or same_answer(r.answer, t["answer"]))
        s.verify_skipped += r.skipped
        full_steps += max(len(b["tokens"]) for b in t["branches"])
        full_tokens += sum(len(b["tokens"]) for b in t["branches"])
        steps += r.steps
        tokens += r.tokens
        s.probes += r.probes / len(traces)
        if t["gold"] is not None:
            scored += 1
            correct += bool(same_answer(r.answer, t["gold"]))
    s.bound = clopper_pearson_upper(s.disagree, s.n, confidence)
    s.steps_saved = 1 - steps / full_steps if full_steps else 0.0
    s.tokens_saved = 1 - tokens / full_tokens if full_tokens else 0.0
    s.accuracy = correct / scored if scored else None
    s.layers_saved = skipped_layers / layers if layers else 0.0
    return s


def knobs(traces: list[dict]) -> dict[str, tuple[str, list[dict]]]:
    """The adjustable knobs, each as (its policy, its settings from cautious to aggressive), in the
    order `path` tests them. The values are fixed in advance, except the pruning floors: quantiles
    of the recorded window confidences (the answers and disagreements play no part in them). Probe
    knobs need runs recorded with probes, layer knobs runs with lens margins.

    The order was set on 2026-12-01 from what the default model showed on its calibration split
    (GSM8K 1019-1318; the profile shipped for it was fitted with the earlier order skip, layers,
    repeat, beta, tau, prune, and is not refitted with this one): repeat, beta and confidence tau
    changed no answer there at their cautious notches, while the layer exit failed at its first
    notch (its scores are on another scale than the full model's) and ended the walk. It therefore
    comes last, and the probes (new) come after the knobs that held."""
    base = early.Thresholds()
    window_means = sorted(
        early.window_mean(b["confs"][:k], base.window)
        for t in traces for b in t["branches"] for k in range(base.window, len(b["confs"]) + 1, base.window)
        if b["confs"])
    floors = [window_means[int(q * (len(window_means) - 1))] for q in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)] \
        if window_means else []
    depth = max((len(b.get("margins") or []) for t in traces for b in t["branches"]), default=0)
    probed = {t.get("probe_every") for t in traces}
    every = probed.pop() if len(probed) == 1 else None  # probe knobs need every run probed, at one interval
    n = max((len(t["branches"]) for t in traces), default=0)
    return {
        "repeat": ("repeat", [{"repeats": r} for r in (16, 12, 8, 6, 4, 3)]),
        "beta": ("beta", [{"beta": b} for b in (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7)]),
        # probe consensus: the problem stops once `agree` branches (finished answers or current probes) agree
        "agree": ("probe", [{"every": every, "agree": a} for a in range(n, max(n // 2, 1), -1)] if every else []),
        "tau": ("confidence", [{"tau": t} for t in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)]),
        # probe stability: a branch whose last `stable` probes read one answer stops with it
        "stable": ("probe", [{"every": every, "stable": k} for k in (6, 5, 4, 3, 2)] if every else []),
        "skip": ("skip", [{"skip_margin": m, "skip_confidence": c}
                          for m, c in ((8, 0.95), (7, 0.95), (6, 0.9), (5, 0.9), (4, 0.8), (3, 0.8), (2, 0.8), (2, 0.0))]),
        "prune": ("confidence", [{"prune_below": f} for f in floors]),
        "layers": ("layers", [{"exit_margin": m, "exit_patience": p, "exit_min_layer": depth * f // 4}
                              for m, p, f in ((8.0, 3, 3), (6.0, 3, 3), (4.0, 2, 3), (4.0, 2, 2), (3.0, 2, 2), (2.0, 1, 2))]
                   if depth else []),
    }


def path(traces: list[dict]) -> list[tuple[str, str, dict]]:
    """The fixed testing sequence: round after round, each knob moves one setting further, in the
    order of `knobs`; a step is (knob, policy, the fields it sets)."""
    ks = knobs(traces)
    steps = []
    for r in range(max(len(v) for _, v in ks.values())):
        steps += [(knob, policy, settings[r]) for knob, (policy, settings) in ks.items() if r < len(settings)]
    return steps


def ordered_path(traces: list[dict], target: float = 0.01, progress: bool = False) -> list[tuple[str, str, dict]]:
    """A testing sequence learnt from other problems than the ones it will be tested on: from
    `exact`, repeatedly take the knob notch that, added to the steps before, changes the fewest of
    these problems' answers and then saves the most (tokens plus decode steps); stop when every next
    notch would change more than `target` of them. Test it with `fit(..., steps=...)` on a second
    split: the order then owes nothing to the problems that confirm it."""
    from tqdm import tqdm

    ks = knobs(traces)
    notch = dict.fromkeys(ks, 0)
    names, th = ("exact",), early.Thresholds()
    steps: list[tuple[str, str, dict]] = []
    bar = tqdm(total=sum(len(s) for _, s in ks.values()), desc="order", disable=not progress)
    while True:
        tried = []
        for knob, (policy, settings) in ks.items():
            if notch[knob] < len(settings):
                fields = settings[notch[knob]]
                names_k = names if policy in names else (*names, policy)
                s = evaluate(traces, names_k, replace(th, **fields))
                tried.append((s, knob, policy, fields, names_k))
        within = [x for x in tried if x[0].disagree <= target * x[0].n]
        if not within:
            break
        s, knob, policy, fields, names = min(
            within, key=lambda x: (x[0].disagree, -(x[0].tokens_saved + x[0].steps_saved), -x[0].verify_skipped,
                                   -x[0].layers_saved))
        th = replace(th, **fields)
        steps.append((knob, policy, fields))
        notch[knob] += 1
        bar.update()
    bar.close()
    return steps


def fit(traces: list[dict], target: float = 0.01, confidence: float = 0.95, progress: bool = False,
        steps: list[tuple[str, str, dict]] | None = None) -> dict:
    """Fixed-sequence testing (Learn then Test): start from `exact` (lossless by construction) and
    walk `steps` (default: `path`, fixed in advance; or `ordered_path` learnt on other problems),
    each step adding to everything before it; a step is accepted while the combination's
    one-sided Clopper-Pearson bound on disagreement stays at or below `target`, and the walk ends at
    the first step that fails. Because the order is fixed before any disagreement is looked at, the
    chosen combination keeps its bound at the stated confidence; picking the best of many candidates
    on the same problems would not (that is how the first calibration overfitted)."""
    from tqdm import tqdm

    steps = path(traces) if steps is None else steps
    names, th = ("exact",), early.Thresholds()
    chosen = evaluate(traces, names, th, confidence)
    report: dict = {"n": len(traces), "target": target, "confidence": confidence,
                    "method": "fixed-sequence testing from exact", "start": chosen.to_dict(), "path": [],
                    "steps": len(steps)}
    for knob, policy, fields in tqdm(steps, desc="fit", disable=not progress):
        names_k = names if policy in names else (*names, policy)
        th_k = replace(th, **fields)
        s = evaluate(traces, names_k, th_k, confidence)
        accepted = s.bound <= target
        report["path"].append({"knob": knob, "set": {k: _plain(v) for k, v in fields.items()}, "accepted": accepted,
                               **s.to_dict()})
        if not accepted:
            break
        names, th, chosen = names_k, th_k, s
    report["combination"] = chosen.to_dict()
    return report


def _plain(v):
    return None if isinstance(v, float) and math.isinf(v) else v



# ---- the command ----

def run(model: str, dtype: str, dataset: str, offset: int, limit: int, branches: int, max_new_tokens: int,
        select_method: str, concurrency: int, target: float, out: Path, profile_path: str | None,
        record_only: bool = False, layers: bool = True, order_from: Path | None = None,
        probes: bool = True, weights: str = "auto") -> dict | None:
    """Record (resuming) and fit; saves fit.json and the profile. Returns the fit report."""
    import sys
    import time

    from tqdm import tqdm

    from rksc.bench.datasets import load_problems
    from rksc.errors import RkscError
    from rksc.reasoning import profiles
    from rksc.reasoning.solver import SolveConfig, Solver

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
    from rksc.errors import RkscError

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
    from rksc.reasoning import profiles

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
    from rksc.engine.sequence import LayerExit, Sequence

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

    for _, result in solver.engine.run((program(p, t) for p, t in zip(problems, traces)), concurrency):
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
