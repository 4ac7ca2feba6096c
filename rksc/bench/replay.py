"""Early-exit policies replayed on recorded full runs, and their thresholds fitted on them.

A trace is one full-computation solve as `trace_of` keeps it (every branch to its end and
verified: tokens, token confidences, answer, stop reason, verifier score, lens margins, probe
reads). `replay` runs policies over it token by token with the same code the solver runs online
(rksc.reasoning.early.Monitor), so a threshold means the same thing in both; `evaluate` scores a
setting over many traces against full computation (disagreement, its Clopper-Pearson bound,
savings); `fit` walks the fixed testing sequence `path` (the method: rksc.bench.calibrate).
Torch-free: `rksc bench` replays its own runs with it, and scripts in benchmarks/ refit offline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from rksc.reasoning import early
from rksc.reasoning.answers import same_answer
from rksc.reasoning.select import Candidate, select


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate after k events in n trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


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
