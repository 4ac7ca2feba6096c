"""Two `rksc bench` runs of the same problems compared problem by problem: a lossy setting against a reference.

For a weight format (or any setting a bench condition cannot express, such as `--weights int8`), run
`rksc bench` once with the reference and once with the setting, over the same problems (several folders
each, e.g. offsets 0 and 50, are pooled), then:

    python benchmarks/paired_runs.py --reference /work/fid/ref-0 --other /work/fid/int8-0 --condition rksc \\
        --out benchmarks/results/fidelity-avx2/int8-natural.json

Prints and writes: each side's accuracy, the paired difference with its 95% bootstrap interval, the
problems whose selected answer changed with a one-sided 95% Clopper-Pearson bound, the errors the
setting introduced and fixed, and both sides' median latency and tokens (timings are comparable only
when both runs had the machine to themselves).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import finish

from rksc.bench.stats import paired


def records(folders: list[str], condition: str) -> dict[str, dict]:
    out = {}
    for folder in folders:
        for line in (Path(folder) / "results.jsonl").read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r and r["condition"] == condition:
                out[r["problem"]] = r
    return out


def compute(folder: str) -> dict | None:
    summary = Path(folder) / "summary.json"
    return json.loads(summary.read_text()).get("compute") if summary.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", nargs="+", required=True, help="bench folders of the reference setting")
    ap.add_argument("--other", nargs="+", required=True, help="bench folders of the setting compared")
    ap.add_argument("--condition", default="rksc")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ref, other = records(args.reference, args.condition), records(args.other, args.condition)
    common = sorted(set(ref) & set(other), key=lambda p: (len(p), p))  # gsm8k-2 before gsm8k-10
    if not common:
        raise SystemExit("the runs share no problem under that condition")
    a, b = [ref[p] for p in common], [other[p] for p in common]
    stats = paired([r["correct"] for r in a], [r["correct"] for r in b],
                   [x["answer"] == y["answer"] for x, y in zip(a, b)])
    side = {name: {"accuracy": sum(r["correct"] for r in rs) / len(rs),
                   "median_latency_s": statistics.median(r["latency_s"] for r in rs),
                   "median_new_tokens": statistics.median(r["new_tokens"] for r in rs)}
            for name, rs in (("reference", a), ("other", b))}
    result = {"problems": len(common), "only_reference": len(set(ref) - set(other)),
              "only_other": len(set(other) - set(ref)), "condition": args.condition,
              "reference": {"folders": args.reference, "compute": compute(args.reference[0]), **side["reference"]},
              "other": {"folders": args.other, "compute": compute(args.other[0]), **side["other"]},
              "accuracy_diff": stats.accuracy_diff, "interval95": [stats.low, stats.high], "mcnemar_p": stats.mcnemar_p,
              "answers_changed": stats.disagree, "answers_changed_bound95": stats.disagree_bound,
              "errors_introduced": stats.induced_errors, "errors_fixed": stats.fixed}
    print(f"{len(common)} problems in both runs ({args.condition})")
    print(f"accuracy: reference {side['reference']['accuracy']:.1%}, other {side['other']['accuracy']:.1%}; "
          f"difference {stats.accuracy_diff * 100:+.1f} points, 95% interval [{stats.low * 100:+.1f}, "
          f"{stats.high * 100:+.1f}]")
    print(f"selected answer changed on {stats.disagree}/{len(common)} (one-sided 95% bound "
          f"{stats.disagree_bound:.1%}); errors introduced {stats.induced_errors}, fixed {stats.fixed}")
    print(f"median latency {side['reference']['median_latency_s']:.1f} s vs {side['other']['median_latency_s']:.1f} s; "
          f"median new tokens {side['reference']['median_new_tokens']:.0f} vs {side['other']['median_new_tokens']:.0f}")
    finish(result, args.out)


if __name__ == "__main__":
    main()
