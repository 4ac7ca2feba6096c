"""One summary from several `rksc bench` runs over consecutive problem ranges of one configuration.

A long paired measurement (hundreds of problems, several conditions) may not fit in one sitting;
each run interleaves its conditions per block as usual, and this script pools the runs as if they
were one (rksc.bench.combine, which `rksc bench --ray` also uses for its shards): records re-indexed
by their problem's position from the first run's offset, each condition's wall time summed over the
runs, the paired statistics, the agreement figures and the early-exit replay on `rksc`'s full runs
recomputed over all problems. It refuses runs whose settings differ (other than offset, limit and output
folder) or whose problems overlap.

    python benchmarks/combine_bench.py runs/cgee-all runs/cgee-a runs/cgee-b
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rksc.bench.combine import combine, load_run, save_run
from rksc.bench.summary import print_summary
from rksc.errors import RkscError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for the pooled results.jsonl, traces_rksc.jsonl and summary.json")
    p.add_argument("runs", nargs="+", help="bench output folders")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    args = p.parse_args()
    try:
        summary, records, traces = combine([load_run(f) for f in args.runs], args.runs)
    except RkscError as e:
        raise SystemExit(str(e)) from None
    summary["config"]["out"] = args.out
    save_run(args.out, (summary, records, traces))
    if args.plots:
        from rksc.bench.plots import write_plots

        write_plots(records, summary, Path(args.out))
    print_summary(summary)
    print(f"pooled {len(args.runs)} runs, {summary['problems']} problems: {args.out}/summary.json")


if __name__ == "__main__":
    main()
