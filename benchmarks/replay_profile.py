"""Replay an early-exit profile on recorded full runs it was not fitted on: how often would it change
the selected answer? The policies run on the recorded token streams with the solver's own code
(rksc.bench.replay.replay), so batch composition and bf16 noise play no part: what differs is
the policy's doing alone. Reads `rksc bench` folders (traces_rksc.jsonl[.gz], written when an early
exit condition ran beside `rksc`) and `rksc calibrate` folders (traces.jsonl[.gz]); refuses traces
of the profile's own calibration problems.

    python benchmarks/replay_profile.py rksc/profiles/qwen2.5-coder-0.5b.json \
        benchmarks/results/cgee05/b050 benchmarks/results/cgee05/b100 --out replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rksc.bench import replay
from rksc.reasoning import profiles


def traces_in(folder: Path) -> list[dict]:
    found = replay.find_traces(folder, "traces_rksc", "traces")
    if found is None:
        sys.exit(f"replay_profile: {folder} holds no traces (traces_rksc.jsonl or traces.jsonl, maybe .gz)")
    traces = replay.load_traces(found)
    summary = folder / "summary.json"
    if summary.exists() and found.name.startswith("traces_rksc"):  # bench: indices count from its offset
        offset = json.loads(summary.read_text())["config"]["offset"]
        traces = [{**t, "index": t["index"] + offset} for t in traces]
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="profile JSON (rksc calibrate)")
    parser.add_argument("folders", nargs="+", help="rksc bench or rksc calibrate output folders")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    profile = profiles.Profile.from_dict(json.loads(Path(args.profile).read_text()))
    traces = sorted((t for f in args.folders for t in traces_in(Path(f))), key=lambda t: t["index"])
    lo, hi = profile.calibration.get("split", [None, None])
    if lo is not None and any(lo <= t["index"] <= hi for t in traces):
        sys.exit(f"replay_profile: these traces include calibration problems {lo}-{hi} of the profile")
    settings = {"+".join(profile.policies): profile.policies,
                **{p: (p,) for p in profile.policies if len(profile.policies) > 1}}
    rows = {}
    for label, names in settings.items():
        s = replay.evaluate(traces, tuple(names), profile.thresholds)
        rows[label] = s.to_dict()
    indices = [t["index"] for t in traces]
    print(f"{profile.model}: profile {args.profile} (calibrated on {lo}-{hi}), replayed on {len(traces)} "
          f"problems {min(indices)}-{max(indices)}")
    print(f"{'policies':<40} {'differ':>8} {'95% bound':>10} {'steps saved':>12} {'tokens saved':>13} {'accuracy':>9}")
    for label, r in rows.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        print(f"{label:<40} {r['disagree']:>4}/{r['n']:<3} {r['bound']:>10.2%} {r['steps_saved']:>12.1%} "
              f"{r['tokens_saved']:>13.1%} {acc:>9}")
    full = sum(bool(t["correct"]) for t in traces) / len(traces)
    print(f"full computation accuracy on these problems: {full:.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"profile": profile.to_dict(), "folders": args.folders,
                                              "problems": indices, "full_accuracy": full, "replay": rows}, indent=2))


if __name__ == "__main__":
    main()
