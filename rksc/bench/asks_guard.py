"""`rksc asks-calibrate`: ASKS's guard on what users care about, the selected answer.

A setting of ASKS (tau, recompute) may become a model's default only if, on a calibration split of
problems whose branches have divergent prompts, it leaves the selected answer of exact prefix
caching (ASKS off) unchanged: the one-sided Clopper-Pearson bound on the share of problems whose
answer it changes is at most `target` (1%) at 95% confidence.

Fixed-sequence testing: PATH lists the settings from the one expected to change least (most
tokens recomputed, highest tau) to the one that reuses most, fixed before any data is seen. They
are tested in that order on the same problems; the first that fails ends the walk, and the last
that passed is the default (none: ASKS stays off). Testing in a fixed order keeps the chance of
passing any setting whose true rate is above the target at 5% without a correction for the number
of settings. A setting fails as soon as it has changed more answers than the whole split could
allow (the bound can then no longer pass), so a failing setting costs only the problems up to
there. Token-level fidelity stays a reported figure (`rksc asks-curve`).

The bookkeeping (`max_changes`, `Trial`, `walk`) is torch-free; `run` solves on the engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rksc.bench.replay import clopper_pearson_upper
from rksc.errors import RkscError
from rksc.reasoning.answers import same_answer

# (tau, recompute), fixed in advance: from most recomputed to most reused
PATH = ((0.9, 0.5), (0.9, 0.3), (0.9, 0.15), (0.7, 0.15), (0.0, 0.15), (0.0, 0.05))
TARGET, CONFIDENCE = 0.01, 0.95


def max_changes(n: int, target: float = TARGET, confidence: float = CONFIDENCE) -> int:
    """The most changed answers out of `n` whose upper bound is still at most `target`; -1: none."""
    k = -1
    while k + 1 <= n and clopper_pearson_upper(k + 1, n, confidence) <= target:
        k += 1
    return k


def min_problems(target: float = TARGET, confidence: float = CONFIDENCE) -> int:
    """The fewest problems for which no change at all passes (299 for 1% at 95%)."""
    n = 1
    while clopper_pearson_upper(0, n, confidence) > target:
        n += 1
    return n


def changed(answer: str | None, reference: str | None) -> bool:
    return not (answer == reference or same_answer(answer, reference))


@dataclass
class Trial:
    """One setting's test on the split, problem by problem."""

    tau: float
    recompute: float
    n: int = 0
    changed: int = 0
    prompts: int = 0  # branch prompts that had a donor
    reused: int = 0  # of those, reused (similarity >= tau)
    status: str = "untested"  # passed | failed | untested
    changed_problems: list[int] = field(default_factory=list)

    def add(self, index: int, answer: str | None, reference: str | None, asks: list | None) -> None:
        self.n += 1
        if changed(answer, reference):
            self.changed += 1
            self.changed_problems.append(index)
        reports = [r for r in (asks or []) if r is not None]
        self.prompts += len(reports)
        self.reused += sum(bool(r.get("reused")) for r in reports)

    def bound(self, confidence: float = CONFIDENCE) -> float:
        return clopper_pearson_upper(self.changed, self.n, confidence)

    def row(self) -> dict:
        return {**asdict(self), "bound": self.bound(), "reuse_rate": self.reused / self.prompts if self.prompts else 0.0}


def walk(reference: dict[int, str | None], answers: dict[tuple[float, float], dict[int, tuple]], n: int,
         target: float = TARGET, path=PATH) -> list[Trial]:
    """Fixed-sequence testing over recorded answers: `answers[(tau, r)][index] = (answer, asks reports)`.
    Each setting counts the problems recorded from the first on; it passes with all `n` recorded and
    its changes within `max_changes(n)`, fails once they exceed it, and is untested otherwise (not
    recorded far enough). The walk stops at the first setting that does not pass."""
    allowed = max_changes(n, target)
    trials = []
    for tau, r in path:
        trial = Trial(tau, r)
        trials.append(trial)
        got = answers.get((tau, r), {})
        for i in range(n):
            if i not in got:
                break
            trial.add(i, got[i][0], reference[i], got[i][1])
        trial.status = "failed" if trial.changed > allowed else "passed" if trial.n == n else "untested"
        if trial.status != "passed":
            break
    return trials


def chosen(trials: list[Trial]) -> Trial | None:
    passed = [t for t in trials if t.status == "passed"]
    return passed[-1] if passed else None


def run(solver, problems: list, contexts: list, config, out: Path, concurrency: int, target: float = TARGET,
        path=PATH, progress: bool = True) -> dict:
    """Walk PATH on the engine: each block of problems solved with ASKS off (once, the reference) and
    with the setting under test, every block from a cold pool; records go to out/answers.jsonl
    (a rerun with the same folder solves only what is missing)."""
    from tqdm import tqdm

    from rksc.bench.harness import run_many

    n = len(problems)
    allowed = max_changes(n, target)
    if allowed < 0:
        raise RkscError(f"a bound of {target:.0%} needs at least {min_problems(target)} problems; "
                        f"the split has {n}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "answers.jsonl"
    done = _read(log)
    reference = {i: v for (s, i), v in done.items() if s is None}  # index -> (answer, asks reports)
    answers: dict = {}
    for (s, i), v in done.items():
        if s is not None:
            answers.setdefault(s, {})[i] = v
    size = max(2 * concurrency, 1)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        for tau, r in path:
            asks_on = replace(config, asks="on", asks_tau=tau, asks_recompute=r)
            bar = tqdm(total=n, desc=f"tau {tau} recompute {r}", unit="problem", disable=not progress)
            trial = Trial(tau, r)
            for start in range(0, n, size):
                block = list(range(start, min(start + size, n)))
                for setting, cfg, store in ((None, replace(config, asks="off"), reference),
                                            ((tau, r), asks_on, answers.setdefault((tau, r), {}))):
                    todo = [i for i in block if i not in store]
                    if not todo:
                        continue
                    solver.engine.drop_cached()  # every run starts cold: no reuse of another run's KV
                    recs, _, _ = run_many(solver, [problems[i] for i in todo], cfg, [contexts[i] for i in todo],
                                          concurrency)
                    for i, rec in zip(todo, recs):
                        store[i] = (rec["answer"], rec["asks"])
                        f.write(json.dumps({"setting": setting and list(setting), "index": i,
                                            "problem": problems[i].id, "answer": rec["answer"],
                                            "asks": rec["asks"], "latency_s": rec["latency_s"]}) + "\n")
                    f.flush()
                for i in block:
                    trial.add(i, answers[(tau, r)][i][0], reference[i][0], answers[(tau, r)][i][1])
                bar.update(len(block))
                bar.set_postfix(changed=trial.changed, allowed=allowed)
                if trial.changed > allowed:
                    break
            bar.close()
            if trial.changed > allowed:  # the walk ends at the first failure
                break
    trials = walk({i: v[0] for i, v in reference.items()}, answers, n, target, path)
    best = chosen(trials)
    return {"problems": n, "target": target, "confidence": CONFIDENCE, "max_changes": allowed,
            "path": [list(p) for p in path], "trials": [t.row() for t in trials],
            "chosen": None if best is None else best.row(), "seconds": time.perf_counter() - t0}


def _read(path: Path) -> dict:
    """(setting or None, index) -> (answer, asks reports) from an earlier run's records."""
    out = {}
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                setting = None if rec["setting"] is None else tuple(rec["setting"])
                out[setting, rec["index"]] = (rec["answer"], rec["asks"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run is solved again
    return out


def profile_doc(model: str, report: dict, split: dict, settings: dict) -> dict:
    """The model's ASKS calibration: the chosen setting (tau None: ASKS stays off) and its guard."""
    best = report["chosen"]
    return {"model": model, "tau": None if best is None else best["tau"],
            "recompute": None if best is None else best["recompute"], "min_run": 8, "probe": 1,
            "guard": {"kind": "answer", "passed": best is not None, "split": split, **settings,
                      "problems": report["problems"], "target": report["target"],
                      "confidence": report["confidence"], "trials": report["trials"]}}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ASKS answer guard: {report['problems']} problems, at most {report['max_changes']} "
                        f"changed answers for a {report['target']:.0%} bound")
    for col in ("tau", "recompute", "problems run", "answers changed", "95% upper bound", "prompts reused", "verdict"):
        table.add_column(col, justify="right")
    for t in report["trials"]:
        table.add_row(f"{t['tau']}", f"{t['recompute']}", str(t["n"]), str(t["changed"]), f"{t['bound']:.1%}",
                      f"{t['reused']}/{t['prompts']}", t["status"])
    Console().print(table)
    best = report["chosen"]
    if best is None:
        print("no setting passed: ASKS stays off by default for this model")
    else:
        print(f"default: tau {best['tau']}, recompute {best['recompute']} ({best['changed']}/{best['n']} answers "
              f"changed, bound {best['bound']:.2%}); ASKS is on by default for this model")
