"""One summary from several `rksc bench` runs over consecutive problem ranges of one configuration.

A long paired measurement (hundreds of problems, several conditions) may not fit in one sitting;
each run interleaves its conditions per block as usual, and this script pools the runs as if they
were one: records re-indexed by their problem's position in the dataset, each condition's wall
time summed over the runs, the paired statistics, the agreement figures and the early-exit replay
on `rksc`'s full runs recomputed over all problems. It refuses runs whose settings differ (other
than offset, limit and output folder) or whose problems overlap.

    python benchmarks/combine_bench.py runs/cgee-all runs/cgee-a runs/cgee-b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksc.bench.harness import print_summary, summarize
from rksc.reasoning import calibrate, early

PER_RUN = ("offset", "limit", "out")


def load_run(folder: Path) -> tuple[dict, list[dict], list[dict]]:
    summary = json.loads((folder / "summary.json").read_text())
    offset = summary["config"]["offset"]
    records = []
    for line in (folder / "results.jsonl").open():
        r = json.loads(line)
        r["index"] += offset  # the problem's position in the dataset: unique across runs
        records.append(r)
    traces = []
    if (folder / "traces_rksc.jsonl").exists():
        for t in calibrate.load_traces(folder / "traces_rksc.jsonl"):
            traces.append({**t, "index": t["index"] + offset})
    return summary, records, traces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for the pooled results.jsonl, traces_rksc.jsonl and summary.json")
    p.add_argument("runs", nargs="+", help="bench output folders")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    args = p.parse_args()
    runs = [load_run(Path(f)) for f in args.runs]
    first = runs[0][0]
    same = {k: v for k, v in first["config"].items() if k not in PER_RUN}
    for folder, (s, _, _) in zip(args.runs, runs):
        other = {k: v for k, v in s["config"].items() if k not in PER_RUN}
        if other != same:
            diff = {k: (same.get(k), other.get(k)) for k in same.keys() | other.keys() if same.get(k) != other.get(k)}
            raise SystemExit(f"{folder}: settings differ from {args.runs[0]}: {diff}")
        if s["model"] != first["model"]:
            raise SystemExit(f"{folder}: model {s['model']} differs from {first['model']}")
    conditions = list(first["per_condition"])
    records = [r for _, rs, _ in runs for r in rs]
    seen: dict[str, int] = {}
    for r in records:
        if r["condition"] == conditions[0]:
            if r["problem"] in seen:
                raise SystemExit(f"problem {r['problem']} is in more than one run")
            seen[r["problem"]] = 1
    walls = {c: sum(s["per_condition"][c]["wall_s"] for s, _, _ in runs) for c in conditions}
    summary = summarize(records, conditions, first["config"].get("resamples", 2000), walls)
    traces = sorted((t for _, _, ts in runs for t in ts), key=lambda t: t["index"])
    for c in conditions:
        replayed = first["per_condition"][c].get("replay_vs_rksc")
        if replayed and traces:
            th = early.Thresholds.from_dict(replayed["thresholds"])
            s = calibrate.evaluate(traces, tuple(replayed["policies"]), th)
            summary["per_condition"][c]["replay_vs_rksc"] = s.to_dict()
    offsets = sorted(s["config"]["offset"] for s, _, _ in runs)
    summary.update(config={**first["config"], "offset": offsets[0], "limit": len(seen), "out": args.out},
                   model=first["model"], profile=first.get("profile"), problems=len(seen),
                   unavailable=first.get("unavailable"), conditions_described=first.get("conditions_described"),
                   missing_features=first.get("missing_features"),
                   runs=[{"folder": f, "offset": s["config"]["offset"], "limit": s["config"]["limit"],
                          "started": s.get("started"), "command": s.get("command"),
                          "walls": {c: s["per_condition"][c]["wall_s"] for c in conditions}}
                         for f, (s, _, _) in zip(args.runs, runs)],
                   machine=first.get("machine"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if traces:
        with open(out / "traces_rksc.jsonl", "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in traces)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.plots:
        from rksc.bench.plots import write_plots

        write_plots(records, summary, out)
    print_summary(summary)
    print(f"pooled {len(runs)} runs, {len(seen)} problems: {out}/summary.json")


if __name__ == "__main__":
    main()
