"""`rksc asks-curve`: what approximate KV reuse saves and changes per tau and recompute fraction."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rksc import validate
from rksc.bench import asks_curve, require_extra
from rksc.cli.common import quiet_transformers
from rksc.errors import RkscError
from rksc.models.registry import DEFAULT_MODEL


def run(args) -> int:
    require_extra("asks-curve")
    model = args.model or DEFAULT_MODEL
    try:
        recomputes = sorted({float(x) for x in args.recompute.split(",") if x.strip()})
    except ValueError:
        raise RkscError("--recompute takes comma-separated fractions, "
                        f"not {args.recompute!r}") from None
    if not recomputes or not all(0 <= r <= 1 for r in recomputes):
        raise RkscError("--recompute fractions must be in [0, 1]")
    validate.integer("tokens", args.tokens, 1)
    validate.integer("min_run", args.min_run, 1)
    validate.integer("probe_layer", args.probe_layer, 1)
    validate.thread_count(args.threads)
    cal, ev = asks_curve.CALIBRATION, asks_curve.EVALUATION
    if args.problems is not None:
        validate.integer("problems", args.problems, 1)
        cal = tuple(replace(s, limit=args.problems) for s in cal)
        ev = tuple(replace(s, limit=args.problems) for s in ev)
    out = Path(args.out or f"runs/asks-curve-{Path(model).name}")
    validate.output_dir(str(out))
    quiet_transformers()
    report = asks_curve.run(model, args.dtype, recomputes, args.tokens, out,
                            args.min_run, cal, ev, args.threads, args.probe_layer,
                            weights=args.weights)
    asks_curve.print_report(report)
    print(f"results: {out}/report.json, {out}/calibration.jsonl, {out}/evaluation.jsonl, "
          f"plot {out}/asks-curve.png")
    return 0
