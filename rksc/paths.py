"""Where rksc keeps what it prepares and builds: $RKSC_HOME (default ~/.cache/rksc).

The bottom layer with rksc.errors and rksc.validate: kernels, models, reasoning profiles and
benchmark data all keep their files under this one folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from rksc.errors import RkscError


def rksc_home() -> Path:
    """$RKSC_HOME (default ~/.cache/rksc); a user error when it names something but a folder."""
    home = Path(os.environ.get("RKSC_HOME") or Path.home() / ".cache" / "rksc").expanduser()
    try:
        if home.exists() and not home.is_dir():
            raise RkscError(f"RKSC_HOME ({home}) is a file, not a folder; point it at a folder")
    except OSError as e:
        raise RkscError(f"RKSC_HOME ({home}) cannot be read: {e.strerror or e}") from None
    return home
