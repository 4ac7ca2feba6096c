"""How many branches end on their own within a token cap: the evidence behind the default
--max-new-tokens. Reads the full-computation traces `rksc calibrate` records (every branch run to
its end or to the cap it was recorded with) and prints, per trace file, the share of branches
that finished within each cap, their length quantiles and the share of problems whose longest
branch hit the recording cap.

    python benchmarks/token_cap.py runs/calibrate-qwen2.5-coder-0.5b-gsm8k [more folders]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rksc.bench.replay import find_traces, load_traces

CAPS = (128, 256, 384, 512, 768, 1024)


def shares(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    path = find_traces(folder, "traces")
    if path is None:
        raise SystemExit(f"token_cap: {folder} holds no traces.jsonl (or .gz)")
    traces = load_traces(path)
    branches = [b for t in traces for b in t["branches"]]
    finished = sorted(len(b["tokens"]) for b in branches if b["reason"] == "finished")
    cap = meta["max_new_tokens"]
    return {
        "model": meta["model"], "dataset": meta["dataset"], "problems": len(traces), "branches": len(branches),
        "recorded_cap": cap,
        "finished_within": {c: sum(n <= c for n in finished) / len(branches) for c in CAPS if c <= cap},
        "finished_length_median": statistics.median(finished) if finished else None,
        "finished_length_p90": finished[int(0.9 * (len(finished) - 1))] if finished else None,
        "problems_with_a_branch_at_the_cap": sum(any(b["reason"] == "length" for b in t["branches"])
                                                 for t in traces) / len(traces),
        "accuracy_full_computation": sum(bool(t["correct"]) for t in traces) / len(traces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="rksc calibrate output folders (meta.json, traces.jsonl or traces.jsonl.gz)")
    parser.add_argument("--out", default="benchmarks/results/token_cap.json")
    args = parser.parse_args()
    rows = [shares(Path(f)) for f in args.folders]
    for r in rows:
        within = ", ".join(f"{c}: {s:.0%}" for c, s in r["finished_within"].items())
        print(f"{r['model']} {r['dataset']} ({r['problems']} problems, {r['branches']} branches, recorded with a "
              f"{r['recorded_cap']}-token cap): finished within {within}; finished length median "
              f"{r['finished_length_median']}, p90 {r['finished_length_p90']}; problems with a branch at the cap "
              f"{r['problems_with_a_branch_at_the_cap']:.0%}; accuracy {r['accuracy_full_computation']:.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
