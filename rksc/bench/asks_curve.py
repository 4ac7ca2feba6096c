"""`rksc asks-curve`: what approximate KV reuse (ASKS) saves and what it changes, per tau and
recompute fraction, against full recompute: token-level fidelity, a reported figure (the default
comes from the answer guard, rksc.bench.asks_guard).

For every case (rksc.bench.variants: a donor and a target prompt about the same problem) and every
recompute fraction r, from a cold pool each time:

- full: the target alone, greedy, `tokens` new tokens (the reference);
- asks: the donor's prompt first, then the target with reuse forced (tau = -inf) at fraction r;
  its similarity is recorded, so any tau's decision is known afterwards (reuse iff similarity >= tau);
- exact: the target after the donor with exact prefix caching only (what the pool does without ASKS);
  its agreement with `full` is the floor numerics alone allow (in bf16 a different split of the same
  computation already changes some tokens).

Fidelity of a reuse: KL divergence and top-1 agreement of the next-token distribution after the
prompt, and whether the first `tokens` greedy tokens are identical to full recompute. A case that
tau sends to full prefill agrees by construction; its cost is the exact prefill plus what the test
adds to it (the reuse copies and the cosines). The fidelity per recompute fraction with every
prompt reused (`by_recompute`, the plot's third panel) compares fractions at equal reuse.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rksc.bench import variants
from rksc.bench.datasets import load_problems
from rksc.engine.driver import failed
from rksc.engine.sequence import Asks, Sequence
from rksc.errors import RkscError
from rksc.reasoning.solver import Solver

TAUS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01)
TARGET = 0.99  # greedy agreement of the first `tokens` tokens that the token-level choice keeps (reported only)
FORCE = -1e9  # a tau every similarity passes


@dataclass(frozen=True)
class Split:
    dataset: str
    offset: int
    limit: int


# calibration and evaluation problems never overlap; few-shot examples come from elsewhere again
CALIBRATION = (Split("gsm8k", 1019, 16), Split("arc-challenge", 1100, 8))
EVALUATION = (Split("gsm8k", 0, 16), Split("arc-challenge", 0, 8))
EXAMPLES = {"gsm8k": (900, 40), "arc-challenge": (900, 40)}


def load_cases(splits, levels=variants.LEVELS) -> list[variants.Case]:
    out = []
    for s in splits:
        problems = load_problems(s.dataset, s.offset, s.limit)
        offset, limit = EXAMPLES[s.dataset]
        examples = load_problems(s.dataset, offset, limit)
        out += variants.cases(problems, examples, levels)
    return out


def _ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


class Probe:
    """Runs single sequences on a solver's engine from a cold pool and times their prefill."""

    def __init__(self, solver):
        if solver.remote:
            raise RkscError("asks-curve measures the local engine; drop --backend")
        self.engine, self.eos = solver.engine, frozenset(solver.eos)

    def reset(self) -> None:
        self.engine.drop_cached()
        self.engine.scheduler.donors.clear()

    def run(self, seq: Sequence) -> tuple[Sequence, float]:
        st = self.engine.stats
        before = st.prefill_s
        self.engine.add(seq)
        while self.engine.has_work:
            self.engine.step()
        failed([seq])
        return seq, st.prefill_s - before


def measure(solver, cases: list[variants.Case], recomputes, tokens: int = 32, min_run: int = 8,
            probe_layer: int = 1, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    probe, tok = Probe(solver), solver.lm.tokenizer
    records = []
    for case in tqdm(cases, desc="asks-curve", unit="case", disable=not progress):
        donor_ids, target_ids = _ids(tok, case.donor), _ids(tok, case.target)
        probe.reset()
        full, full_s = probe.run(Sequence(target_ids, tokens, stop_ids=probe.eos, keep_logits=True))
        full_logp = torch.log_softmax(full.out.logits, -1)

        def compare(seq: Sequence) -> dict:
            logp = torch.log_softmax(seq.out.logits, -1)
            same = [a == b for a, b in zip(full.token_ids, seq.token_ids)]
            return {"kl": float((full_logp.exp() * (full_logp - logp)).sum()),
                    "top1": int(full.out.logits.argmax()) == int(seq.out.logits.argmax()),
                    "greedy": full.token_ids == seq.token_ids,
                    "agree_prefix": next((i for i, s in enumerate(same) if not s), len(same))}

        # exact prefix caching only, the donor cached: its agreement with the cold run is the
        # floor that numerics alone (bf16, another split of the same computation) allow
        probe.reset()
        donor, _ = probe.run(Sequence(donor_ids, 0, hold=True))
        exact, exact_s = probe.run(Sequence(target_ids, tokens, stop_ids=probe.eos, keep_logits=True))
        probe.engine.release(donor)
        floor = compare(exact)
        for r in recomputes:
            probe.reset()
            donor, _ = probe.run(Sequence(donor_ids, 0, hold=True, asks=Asks(2.0, min_run=min_run)))
            seq, asks_s = probe.run(Sequence(target_ids, tokens, stop_ids=probe.eos, keep_logits=True,
                                             asks=Asks(FORCE, r, min_run, probe_layer)))
            probe.engine.release(donor)
            report = seq.out.asks_report
            records.append({
                "problem": case.problem.id, "dataset": case.problem.dataset, "level": case.level, "recompute": r,
                "donor_tokens": len(donor_ids), "target_tokens": len(target_ids),
                "exact_cached": exact.out.cached_tokens,
                "similarity": None if report is None else report["similarity"],
                "matched": 0 if report is None else report["matched"],
                "asks_cached": 0 if report is None else report["cached_tokens"],  # exact prefix hits
                "recomputed": len(target_ids) if report is None else report["recomputed"],
                "test_s": 0.0 if report is None else report["test_s"],
                "full_s": full_s, "asks_s": asks_s, "exact_s": exact_s,
                **compare(seq), **{f"exact_{k}": v for k, v in floor.items()},
            })
    return records


def sweep(records: list[dict], taus=TAUS) -> list[dict]:
    """Per (recompute, tau): reuse rate, fidelity over all cases and over the reused ones, and
    prefill time against full recompute and against exact prefix caching."""
    rows = []
    for r in sorted({x["recompute"] for x in records}):
        rs = [x for x in records if x["recompute"] == r]
        for tau in taus:
            rows.append({"recompute": r, "tau": tau, **decide(rs, tau)})
    return rows


def decide(rs: list[dict], tau: float) -> dict:
    reused = [x for x in rs if x["similarity"] is not None and x["similarity"] >= tau]
    chosen = {id(x) for x in reused}
    cost = sum(x["asks_s"] if id(x) in chosen else x["test_s"] + x["exact_s"] for x in rs)
    full, exact = sum(x["full_s"] for x in rs), sum(x["exact_s"] for x in rs)
    n = len(rs)
    return {
        "n": n, "reused": len(reused), "reuse_rate": len(reused) / n if n else 0.0,
        "greedy_agreement": (n - sum(not x["greedy"] for x in reused)) / n if n else 1.0,
        "top1_agreement": (n - sum(not x["top1"] for x in reused)) / n if n else 1.0,
        "greedy_agreement_reused": statistics.fmean(x["greedy"] for x in reused) if reused else None,
        "mean_kl_reused": statistics.fmean(x["kl"] for x in reused) if reused else None,
        "mean_agree_prefix_reused": statistics.fmean(x["agree_prefix"] for x in reused) if reused else None,
        # the same comparison for exact prefix caching (no ASKS): what numerics alone change
        "exact_greedy_agreement": statistics.fmean(x["exact_greedy"] for x in rs) if rs else None,
        "exact_greedy_agreement_reused": statistics.fmean(x["exact_greedy"] for x in reused) if reused else None,
        "prefill_s": cost, "full_s": full, "exact_s": exact,
        # what the similarity test adds to a plain prefill (reuse copies, KV set aside, cosines) against a full one
        "test_fraction": sum(x["test_s"] for x in rs if x["similarity"] is not None) / sum(
            x["full_s"] for x in rs if x["similarity"] is not None) if any(x["similarity"] is not None for x in rs) else None,
        "saved_vs_full": 1 - cost / full if full else 0.0, "saved_vs_exact": 1 - cost / exact if exact else 0.0,
    }


def choose(rows: list[dict], target: float = TARGET) -> dict | None:
    """The (recompute, tau) with the most prefill time saved against exact prefix caching among
    those that reuse something, save time against it and keep greedy agreement >= target; None:
    ASKS stays off (a tau that keeps fidelity only by almost never reusing costs its test for nothing)."""
    ok = [x for x in rows if x["reused"] > 0 and x["saved_vs_exact"] > 0 and x["greedy_agreement"] >= target]
    if not ok:
        return None
    return max(ok, key=lambda x: (x["saved_vs_exact"], -x["tau"]))


def by_recompute(records: list[dict]) -> list[dict]:
    """Per recompute fraction, every case with a donor reused (tau = 0): fidelity with the greedy
    agreement's 95% Wilson interval, so the fractions compare at equal reuse."""
    out = []
    for r in sorted({x["recompute"] for x in records}):
        row = decide([x for x in records if x["recompute"] == r and x["similarity"] is not None], 0.0)
        same = sum(x["greedy"] for x in records if x["recompute"] == r and x["similarity"] is not None)
        out.append({"recompute": r, **row, "greedy_interval": wilson(same, row["reused"])})
    return out


def wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return (float(ci.low), float(ci.high))


def per_level(records: list[dict], tau: float, recompute: float) -> dict:
    rs = [x for x in records if x["recompute"] == recompute]
    return {level: decide([x for x in rs if x["level"] == level], tau)
            for level in variants.LEVELS if any(x["level"] == level for x in rs)}


def run(model: str, dtype: str, recomputes, tokens: int, out: Path, min_run: int = 8,
        calibration=CALIBRATION, evaluation=EVALUATION, threads: int | None = None, probe_layer: int = 1,
        weights: str = "auto") -> dict:
    cal_cases, eval_cases = load_cases(calibration), load_cases(evaluation)
    solver = Solver.load(model, dtype, threads=threads, weights=weights)
    measure(solver, cal_cases[:1], recomputes[:1], 2, min_run, probe_layer, progress=False)  # warm-up, not kept
    t = time.perf_counter()
    cal = measure(solver, cal_cases, recomputes, tokens, min_run, probe_layer)
    ev = measure(solver, eval_cases, recomputes, tokens, min_run, probe_layer)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("calibration", cal), ("evaluation", ev)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in recs)
    settings = {"model": solver.lm.name, "dtype": solver.lm.dtype, "compute": solver.lm.compute.describe(),
                "tokens": tokens, "min_run": min_run, "probe": probe_layer,
                "calibration": [asdict(s) for s in calibration], "evaluation": [asdict(s) for s in evaluation],
                "cases": len(cal_cases), "seconds": time.perf_counter() - t,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    return build_report(settings, cal, ev, out)


def build_report(settings: dict, cal: list[dict], ev: list[dict], out: Path) -> dict:
    """Sweeps, the setting token agreement would choose and the per-level table from recorded cases
    (also to refit recorded runs without measuring again); writes report.json and the plot."""
    cal_rows, eval_rows = sweep(cal), sweep(ev)
    chosen = choose(cal_rows)
    report = {**settings, "target": TARGET, "chosen": chosen, "calibration_sweep": cal_rows,
              "evaluation_sweep": eval_rows}
    recomputes = sorted({x["recompute"] for x in ev})
    if chosen is not None:
        tau, r = chosen["tau"], chosen["recompute"]
        report["evaluation_at_default"] = decide([x for x in ev if x["recompute"] == r], tau)
        report["evaluation_per_level"] = per_level(ev, tau, r)
    # fidelity per recompute fraction at equal reuse: every prompt with a donor reused
    report["evaluation_by_recompute"] = by_recompute(ev)
    # what reuse does per level when it happens: every prompt with a donor reused
    r = 0.15 if 0.15 in recomputes else recomputes[0]
    report["evaluation_per_level_reuse_all"] = {"tau": 0.0, "recompute": r, "levels": per_level(ev, 0.0, r)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out)
    return report


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for r in sorted({x["recompute"] for x in report["evaluation_sweep"]}):
        rows = [x for x in report["evaluation_sweep"] if x["recompute"] == r]
        axes[0].plot([x["saved_vs_exact"] * 100 for x in rows], [x["greedy_agreement"] * 100 for x in rows],
                     marker="o", label=f"recompute {r:.0%}")
        axes[1].plot([x["tau"] for x in rows], [x["reuse_rate"] * 100 for x in rows], marker="o",
                     label=f"recompute {r:.0%}")
    axes[0].axhline(TARGET * 100, color="grey", ls="--", lw=0.8)
    axes[0].set_xlabel("prefill time saved vs exact prefix caching (%)")
    axes[0].set_ylabel(f"greedy agreement, first {report['tokens']} tokens (%)")
    axes[0].set_title("evaluation split: one point per tau")
    axes[1].set_xlabel("tau")
    axes[1].set_ylabel("prompts reused (%)")
    axes[1].set_title("reuse rate")
    curve = report["evaluation_by_recompute"]
    rs = [x["recompute"] * 100 for x in curve]
    agree = [x["greedy_agreement_reused"] * 100 for x in curve]
    lo = [a - x["greedy_interval"][0] * 100 for a, x in zip(agree, curve)]
    hi = [x["greedy_interval"][1] * 100 - a for a, x in zip(agree, curve)]
    axes[2].errorbar(rs, agree, yerr=[lo, hi], marker="o", capsize=3, label="greedy agreement (95% Wilson)")
    axes[2].axhline(curve[0]["exact_greedy_agreement"] * 100, color="grey", ls="--", lw=0.8,
                    label="exact prefix caching")
    axes[2].set_xlabel("reused tokens recomputed (%)")
    axes[2].set_ylabel(f"greedy agreement, first {report['tokens']} tokens (%)")
    axes[2].set_title("every prompt with a donor reused")
    kl = axes[2].twinx()
    kl.plot(rs, [max(x["mean_kl_reused"], 1e-9) for x in curve], color="tab:red", marker="s", ls=":",
            label="mean next-token KL")
    kl.set_yscale("log")
    kl.set_ylabel("mean KL to full recompute", color="tab:red")
    kl.legend(fontsize=8, loc="center right")
    for ax in axes:
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    fig.suptitle(f"ASKS on {report['model']} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(out / "asks-curve.png", dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _table(title: str, lead: tuple[str, ...], rows: list[tuple[tuple[str, ...], dict]], exact_key: str,
           test_fraction: bool = False):
    """One table of fidelity and savings; each row is its leading cells and its measurements."""
    from rich.table import Table

    table = Table(title=title)
    cols = (*lead, "reused", "greedy agree", "greedy agree (reused)",
            "same, exact caching" + (" (reused)" if exact_key.endswith("_reused") else ""),
            "top-1 agree", "KL (reused)", "saved vs full", "saved vs exact") + (("test / full prefill",) if test_fraction else ())
    for col in cols:
        table.add_column(col, justify="right")
    for cells, x in rows:
        table.add_row(*cells, f"{x['reused']}/{x['n']}", _pct(x["greedy_agreement"]), _pct(x["greedy_agreement_reused"]),
                      _pct(x[exact_key]), _pct(x["top1_agreement"]),
                      "-" if x["mean_kl_reused"] is None else f"{x['mean_kl_reused']:.3f}",
                      _pct(x["saved_vs_full"]), _pct(x["saved_vs_exact"]),
                      *((_pct(x["test_fraction"]),) if test_fraction else ()))
    return table


def print_report(report: dict) -> None:
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 160)
    for name in ("calibration_sweep", "evaluation_sweep"):
        rows = [((f"{x['recompute']:.2f}", f"{x['tau']:.2f}"), x) for x in report[name]]
        console.print(_table(f"{name.split('_')[0]}: per recompute fraction and tau", ("recompute", "tau"), rows,
                             "exact_greedy_agreement_reused"))
    chosen = report["chosen"]
    if chosen is None:
        console.print(f"no setting keeps greedy agreement >= {TARGET:.0%} while reusing anything and saving time "
                      "against exact prefix caching")
    else:
        console.print(f"token-level choice: tau {chosen['tau']}, recompute {chosen['recompute']} (calibration: reuse "
                      f"{_pct(chosen['reuse_rate'])}, greedy agreement {_pct(chosen['greedy_agreement'])}); the "
                      "default comes from the answer guard, `rksc asks-calibrate`")
    levels = [("evaluation split per divergence level at the default", report.get("evaluation_per_level"))]
    every = report["evaluation_per_level_reuse_all"]
    levels.append((f"evaluation split per divergence level, every prompt with a donor reused (tau {every['tau']}, "
                   f"recompute {every['recompute']})", every["levels"]))
    for title, rows in levels:
        if rows is not None:
            console.print(_table(title, ("level",), [((level,), x) for level, x in rows.items()],
                                 "exact_greedy_agreement", test_fraction=True))
