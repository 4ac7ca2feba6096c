"""Benchmark and calibration tooling above the solver: `rksc bench`, `rksc calibrate`, `rksc
asks-curve`, the datasets they read and the statistics, bounds and plots they write.

Their libraries are the bench extra (pip install 'rksc[bench]'), imported inside the functions that
use them, so the CLI's parser and a core install can import this package without them.
"""

from __future__ import annotations

import importlib.util

from rksc.errors import RkscError

EXTRA = ("scipy", "matplotlib", "pyarrow")  # pyproject.toml's `bench` extra


def require_extra(command: str) -> None:
    """One line (an RkscError, exit 2) when the bench extra is not installed; imports nothing."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise RkscError(f"rksc {command} needs the bench extra ({', '.join(missing)} not "
                        "installed): pip install 'rksc[bench]'")
