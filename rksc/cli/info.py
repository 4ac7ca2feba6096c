"""`rksc info`: this machine, and the dtype, weight format and kernels rksc chooses on it."""

from __future__ import annotations

import json

from rksc.kernels.machine import probe
from rksc.models import compute
from rksc.report import print_info


def run(args) -> int:
    here = probe()
    # a choice this machine cannot run: one line, exit 2
    chosen = compute.choose(here, args.dtype, args.weights)
    info = {"machine": here.describe(), "asked": {"dtype": args.dtype, "weights": args.weights},
            "chosen": chosen.describe(), "formats": compute.formats(here),
            "timings": compute.measure(here) if args.measure else None}
    if args.json:
        print(json.dumps(info))
    else:
        print_info(info)
    return 0
