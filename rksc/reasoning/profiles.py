"""Early-exit calibration profiles: per model, the thresholds `rksc calibrate` chose and what they
achieved on the calibration split. Solve and bench use the model's profile by default.

A profile is JSON, found first under $RKSC_HOME/profiles/<model>.json (your own calibrations),
then among the profiles shipped in the package (rksc/profiles/<model>.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rksc.errors import RkscError
from rksc.paths import rksc_home
from rksc.reasoning.early import Thresholds

PACKAGED = Path(__file__).resolve().parent.parent / "profiles"


@dataclass
class Profile:
    model: str
    policies: tuple[str, ...]  # the calibrated combination "cgee" stands for
    thresholds: Thresholds
    calibration: dict = field(default_factory=dict)  # dataset, split, n, target, bound, savings, ...

    @property
    def calibrated(self) -> list[str]:
        """Policies whose thresholds were fitted (the others keep their defaults)."""
        return self.calibration.get("calibrated", [])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policies"] = list(self.policies)
        d["thresholds"] = self.thresholds.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        return cls(d["model"], tuple(d["policies"]), Thresholds.from_dict(d["thresholds"]), d.get("calibration", {}))


def user_dir() -> Path:
    return rksc_home() / "profiles"


def path_for(model: str, packaged: bool = False) -> Path:
    return (PACKAGED if packaged else user_dir()) / f"{_safe(model)}.json"


def find(model: str) -> Profile | None:
    for path in (path_for(model), path_for(model, packaged=True)):
        if path.is_file():
            return load(path)
    return None


def asks_path_for(model: str, packaged: bool = False) -> Path:
    return (PACKAGED if packaged else user_dir()) / f"{_safe(model)}.asks.json"


def asks_calibration(model: str) -> dict | None:
    """The model's ASKS calibration as saved by `rksc asks-calibrate --save` (its tau is None when no
    setting passed), or None when it has none."""
    for path in (asks_path_for(model), asks_path_for(model, packaged=True)):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise RkscError(f"cannot read the ASKS calibration {path}: {e}") from None
    return None


def find_asks(model: str) -> dict | None:
    """The model's ASKS calibration if it gives a tau (ASKS may be on), else None."""
    d = asks_calibration(model)
    return d if d is not None and d.get("tau") is not None else None


def asks_guarded(calibration: dict | None) -> bool:
    """Whether a calibration's setting passed the answer guard (then `--asks auto` turns ASKS on)."""
    return bool(calibration and calibration.get("tau") is not None
                and (calibration.get("guard") or {}).get("passed") is True)


def asks_default(model: str) -> tuple[bool, str]:
    """Whether ASKS is on by default (`--asks auto`) for `model`, and why, in a few words."""
    d = asks_calibration(model)
    if d is None:
        return False, f"not calibrated (rksc asks-calibrate --model {model} --save)"
    guard = d.get("guard") or {}
    if asks_guarded(d):
        last = next((t for t in reversed(guard.get("trials", [])) if t.get("status") == "passed"), {})
        return True, (f"tau {d['tau']}, recompute {d['recompute']}: {last.get('changed', '?')}/{last.get('n', '?')} "
                      f"selected answers changed on its calibration split (bound {last.get('bound', float('nan')):.1%})")
    if guard.get("kind") != "answer":
        return False, "calibrated on token agreement only, not on selected answers (rksc asks-calibrate)"
    first = next(iter(guard.get("trials", [])), {})
    return False, (f"no setting passed its answer guard (the first, tau {first.get('tau')} recompute "
                   f"{first.get('recompute')}, changed {first.get('changed', '?')} of {first.get('n', '?')} "
                   f"answers; at most {guard.get('target', 0.01):.0%} allowed)")


def asks_missing(model: str) -> str:
    """Why `--asks on` has no tau for `model`, as one line."""
    on, why = asks_default(model)
    return f"--asks on needs a similarity threshold for {model}, and its calibration gives none ({why}): give --asks-tau"


def save_asks(calibration: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration, indent=2) + "\n")
    return path


def load(path: str | Path) -> Profile:
    try:
        return Profile.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RkscError(f"cannot read the calibration profile {path}: {e}") from None


def save(profile: Profile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def _safe(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in Path(model).name or model)
