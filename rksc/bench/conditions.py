"""Benchmark conditions: what each one computes, and whether this build can run it.

A condition `needs` features (it is listed as unavailable when one is not built) and `uses`
optional features (switched on when built; the summary records which were on).
"""

from __future__ import annotations

from dataclasses import dataclass

from rksc import validate
from rksc.errors import RkscError

# features this build implements; early exit runs on the block pool engine only
BUILT = frozenset({"sharing", "pool", "cgee", "asks"})


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    path: str  # how it runs: "naive" (plain transformers), "none" (no sharing), "shared" (prefix KV)
    # baselines, or "pool" (the engine)
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    verifier: str = "prompt"  # "continue": ask on top of each branch's own KV (block pool only)
    early_stop: tuple[str, ...] = ()  # early-exit policies (rksc.reasoning.early); "cgee": the calibrated set
    asks: bool = False  # approximate KV reuse across prompts (rksc.engine.blend)

    @property
    def available(self) -> bool:
        return self.needs <= BUILT

    @property
    def features(self) -> list[str]:
        return sorted((self.needs | self.uses) & BUILT)

    @property
    def missing(self) -> list[str]:
        return sorted((self.needs | self.uses) - BUILT)


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("naive", "transformers generate() on B full prompts, then B full verifier prompts", "naive"),
    Condition("nokv", "paper's No-KV baseline: branches batched, every row prefills its whole prompt", "none"),
    Condition("prefix", "exact prefix caching for generation and verification (vLLM/SGLang), no early exit",
              "shared", needs=frozenset({"sharing"})),
    Condition("rksc", "sharing, block pool engine, verifier as a continuation of each branch; no early exit",
              "pool", needs=frozenset({"sharing", "pool"}), verifier="continue"),
    Condition("cgee", "rksc plus the model's calibrated early exit (its profile's policies and thresholds)",
              "pool", needs=frozenset({"sharing", "pool", "cgee"}), verifier="continue", early_stop=("cgee",)),
    *(Condition(name, f"rksc plus the early-exit policy '{name}' alone (calibrated thresholds)", "pool",
                needs=frozenset({"sharing", "pool", "cgee"}), verifier="continue", early_stop=(name,))
      for name in ("exact", "beta", "confidence", "repeat", "probe")),
    Condition("gates", "rksc plus the verifier gates: skip (a) and layer exit (b), calibrated", "pool",
              needs=frozenset({"sharing", "pool", "cgee"}), verifier="continue", early_stop=("skip", "layers")),
    Condition("asks", "rksc plus approximate KV reuse across prompts that differ (ASKS, calibrated tau)",
              "pool", needs=frozenset({"sharing", "pool", "asks"}), verifier="continue", asks=True),
    Condition("kv-only", "ablation: sharing and block pool with the paper's separate verifier prompt, no early exit",
              "pool", needs=frozenset({"sharing", "pool"})),
    Condition("cgee-only", "ablation: early exit without prefix sharing (early exit runs on the engine only)",
              "none", needs=frozenset({"cgee", "cgee-without-sharing"})),
)}
DEFAULT_CONDITIONS = ("naive", "nokv", "prefix", "rksc")


def check_names(value) -> None:
    """Condition names: a non-empty tuple (or list) of strings (known names: BenchConfig checks)."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(x, str) for x in value):
        raise RkscError(f"conditions must be a tuple of names (got {validate.show(value)})")
    if not value:
        raise RkscError(f"no conditions given; choose from {', '.join(CONDITIONS)}")


def schedule(problems: int, conditions: list[str], block: int = 1) -> list[tuple[list[int], str]]:
    """Interleaved order in blocks of `block` problems: every condition on block 0, then on block 1, ..."""
    starts = range(0, problems, block)
    return [(list(range(s, min(s + block, problems))), c) for s in starts for c in conditions]
