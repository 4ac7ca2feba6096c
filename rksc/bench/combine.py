"""One summary from several `rksc bench` runs over disjoint problem ranges of one configuration.

A run is (summary, records, traces) as a bench run leaves them (summary.json, results.jsonl,
traces_rksc.jsonl). Pooled as if they were one run: records re-indexed by their problem's position
from the first run's offset (as one run's are from its own), each condition's wall time summed over
the runs, the paired statistics, the agreement figures and the early-exit replay on `rksc`'s full
runs recomputed over all problems.
Runs whose settings differ (other than offset, limit and output folder) or whose problems overlap
are refused. A pooled run can be pooled again with further runs (its parts are listed, not itself).
Used by `rksc bench --ray` (one run per worker) and benchmarks/combine_bench.py (runs made one after
another).
"""

from __future__ import annotations

import json
from pathlib import Path

from rksc.bench.replay import evaluate, find_traces, load_traces
from rksc.bench.summary import summarize
from rksc.errors import RkscError
from rksc.reasoning import early

PER_RUN = ("offset", "limit", "out")
Run = tuple[dict, list[dict], list[dict]]


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    traces = find_traces(folder, "traces_rksc")
    return summary, records, load_traces(traces) if traces else []


def save_run(folder: str | Path, run: Run) -> None:
    summary, records, traces = run
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if traces:
        with open(folder / "traces_rksc.jsonl", "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in traces)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def combine(runs: list[Run], names: list[str]) -> Run:
    """Pool `runs` (named by `names` in messages and in the summary's "runs")."""
    first = runs[0][0]
    same = {k: v for k, v in first["config"].items() if k not in PER_RUN}
    for name, (s, _, _) in zip(names, runs):
        other = {k: v for k, v in s["config"].items() if k not in PER_RUN}
        if other != same:
            diff = {k: (same.get(k), other.get(k)) for k in same.keys() | other.keys() if same.get(k) != other.get(k)}
            raise RkscError(f"{name}: settings differ from {names[0]}: {diff}")
        if s["model"] != first["model"]:
            raise RkscError(f"{name}: model {s['model']} differs from {first['model']}")
    conditions = list(first["per_condition"])
    start = min(s["config"]["offset"] for s, _, _ in runs)  # indices stay relative to the offset, as in one run
    records = [{**r, "index": r["index"] + s["config"]["offset"] - start} for s, rs, _ in runs for r in rs]
    seen = set()
    for r in records:
        if r["condition"] == conditions[0]:
            if r["problem"] in seen:
                raise RkscError(f"problem {r['problem']} is in more than one run")
            seen.add(r["problem"])
    walls = {c: sum(s["per_condition"][c]["wall_s"] for s, _, _ in runs) for c in conditions}
    summary = summarize(records, conditions, first["config"].get("resamples", 2000), walls)
    traces = sorted(({**t, "index": t["index"] + s["config"]["offset"] - start} for s, _, ts in runs for t in ts),
                    key=lambda t: t["index"])
    for c in conditions:
        replayed = first["per_condition"][c].get("replay_vs_rksc")
        if replayed and traces:
            th = early.Thresholds.from_dict(replayed["thresholds"])
            summary["per_condition"][c]["replay_vs_rksc"] = evaluate(traces, tuple(replayed["policies"]),
                                                                     th).to_dict()
    summary.update(config={**first["config"], "offset": start, "limit": len(seen)},
                   model=first["model"], profile=first.get("profile"), problems=len(seen),
                   unavailable=first.get("unavailable"), conditions_described=first.get("conditions_described"),
                   missing_features=first.get("missing_features"),
                   runs=[part for name, (s, _, _) in zip(names, runs) for part in _parts(name, s, conditions)],
                   machine=first.get("machine"))
    return summary, records, traces


def _parts(name: str, summary: dict, conditions: list[str]) -> list[dict]:
    """The runs `summary` stands for: itself, or the parts it was pooled from (pooling is associative)."""
    if summary.get("runs"):
        return summary["runs"]
    return [{"folder": name, "offset": summary["config"]["offset"], "limit": summary["config"]["limit"],
             "started": summary.get("started"), "finished": summary.get("finished"), "command": summary.get("command"),
             "machine": summary.get("machine"),
             "walls": {c: summary["per_condition"][c]["wall_s"] for c in conditions}}]
