"""rksc: fast multi-branch LLM reasoning on CPU (shared prefix KV, verifier, selection)."""

from rksc.errors import RkscError
from rksc.models.loader import LoadedModel, load
from rksc.reasoning.solver import SolveConfig, SolveResult, Solver

__all__ = ["LoadedModel", "RkscError", "SolveConfig", "SolveResult", "Solver", "load"]
__version__ = "0.1.0"
