"""What several commands do before their work: check --asks and --ray, quiet transformers, open
a Solver."""

from __future__ import annotations

import os
import sys

from transformers.utils import logging as hf_logging

from rksc import validate
from rksc.cluster.ray import require
from rksc.errors import RkscError
from rksc.models.loader import display_name
from rksc.models.registry import DEFAULT_MODEL
from rksc.reasoning import profiles
from rksc.reasoning.solver import Solver


def check_asks(model: str | None, asks: str, tau: float | None) -> None:
    """--asks on needs a tau: given, or the model's calibration (checked before the slow load)."""
    if asks != "on" or tau is not None:
        return
    name = display_name(model or DEFAULT_MODEL)
    if profiles.find_asks(name) is None:
        raise RkscError(profiles.asks_missing(name))


def check_ray(args) -> None:
    """--ray and --ray-workers make sense, and Ray is installed: before anything slow."""
    if args.ray is None:
        if args.ray_workers is not None:
            raise RkscError("--ray-workers needs --ray")
        return
    validate.optional_integer("ray-workers", args.ray_workers, 1)
    require()


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def open_solver(solver_kwargs: dict) -> Solver:
    """Solver.open here; on a remote backend, say what the server gives."""
    solver = Solver.open(**solver_kwargs)
    if solver.remote:
        print(f"rksc: backend {solver.engine.base_url}: {solver.engine.features.describe()}",
              file=sys.stderr)
        for warning in solver.engine.warnings:
            print(f"rksc: warning: {warning}", file=sys.stderr)
    return solver
