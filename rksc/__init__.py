"""rksc: fast multi-branch LLM reasoning on CPU (shared prefix KV, verifier, selection)."""

from rksc.errors import RkscError

__all__ = ["LoadedModel", "RkscError", "SolveConfig", "SolveResult", "Solver", "load"]
__version__ = "0.1.0"

# The API names import torch and transformers (seconds); they load on first use, so the command line
# starts at once and a Ctrl-C during start-up lands in its handler instead of printing a traceback.
_LAZY = {"LoadedModel": "rksc.models.loader", "load": "rksc.models.loader",
         "SolveConfig": "rksc.reasoning.config", "SolveResult": "rksc.reasoning.result",
         "Solver": "rksc.reasoning.solver"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rksc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
