"""`rksc calibrate`: fit the early-exit thresholds of a model on a calibration split."""

from __future__ import annotations

from pathlib import Path

from rksc import validate
from rksc.bench import calibrate, require_extra
from rksc.cli.common import quiet_transformers
from rksc.errors import RkscError
from rksc.models.registry import DEFAULT_MODEL


def run(args) -> int:
    require_extra("calibrate")
    model = args.model or DEFAULT_MODEL
    offset, limit = _split(args)
    validate.integer("offset", offset, 0)
    validate.integer("limit", limit, 1)
    validate.integer("concurrency", args.concurrency, 1, validate.MAX_CONCURRENCY)
    validate.number("target", args.target, above=0, maximum=1)
    out = Path(args.out or f"runs/calibrate-{Path(model).name}-{args.dataset}")
    validate.output_dir(str(out))
    order_from = Path(args.order_from) if args.order_from is not None else None
    if order_from is not None:
        if not (order_from / "meta.json").is_file():
            raise RkscError(f"--order-from {args.order_from}: not an `rksc calibrate` folder "
                            "(no meta.json)")
        if order_from.resolve() == out.resolve():
            raise RkscError(f"--order-from and --out are both {out}: record this split in a "
                            "folder of its own (--out)")
    if args.profile is not None:  # checked now, not after an hour of recording
        validate.output_dir(str(Path(args.profile).parent), "--profile")
    quiet_transformers()
    report = calibrate.run(model, args.dtype, args.dataset, offset, limit, args.branches,
                           args.max_new_tokens, args.select, args.concurrency, args.target, out,
                           args.profile, args.record_only, args.layers,
                           order_from if args.order_from else None, args.probes,
                           weights=args.weights)
    if report is not None:
        calibrate.print_report(report)
    return 0


def _split(args) -> tuple[int, int]:
    """(offset, limit) from --split, --offset and --limit, or the dataset's calibration split."""
    offset, limit = calibrate.SPLITS.get(args.dataset, (None, None))
    if args.split is not None:
        if args.offset is not None or args.limit is not None:
            raise RkscError("give either --split or --offset/--limit, not both")
        first, sep, last = args.split.partition("-")
        digits = sep and first.strip().isdigit() and last.strip().isdigit()
        if not digits or int(last) < int(first):
            raise RkscError("--split takes FIRST-LAST problem indices (e.g. 1019-1318), "
                            f"not {args.split!r}")
        offset, limit = int(first), int(last) - int(first) + 1
    offset = args.offset if args.offset is not None else offset
    limit = args.limit if args.limit is not None else limit
    if offset is None or limit is None:
        raise RkscError(f"no default calibration split for {args.dataset}: give --offset and "
                        "--limit")
    return offset, limit
