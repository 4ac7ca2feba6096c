"""`rksc info`: this machine, the dtype, weight format and kernels rksc chooses on it, and where ASKS is on."""

from __future__ import annotations

import json

from rksc.kernels.machine import probe
from rksc.models import compute
from rksc.models.registry import MODELS
from rksc.reasoning import profiles
from rksc.report import print_info


def run(args) -> int:
    here = probe()
    # a choice this machine cannot run: one line, exit 2
    chosen = compute.choose(here, args.dtype, args.weights)
    info = {"machine": here.describe(), "asked": {"dtype": args.dtype, "weights": args.weights},
            "chosen": chosen.describe(), "formats": compute.formats(here),
            "timings": compute.measure(here) if args.measure else None,
            "asks": {name: dict(zip(("on", "why"), profiles.asks_default(name))) for name in MODELS}}
    if args.json:
        print(json.dumps(info))
    else:
        print_info(info)
    return 0
