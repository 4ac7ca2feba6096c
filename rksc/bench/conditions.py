"""Benchmark conditions: what each one computes, and whether this build can run it.

A condition `needs` features (it is listed as unavailable when one is not built) and `uses`
optional features (switched on when built; the summary records which were on).
"""

from __future__ import annotations

from dataclasses import dataclass

# features this build implements; CGEE arrives with its own issue
BUILT = frozenset({"sharing", "pool"})


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    backend: str  # "naive" (plain transformers), "none" (no sharing), "shared" (prefix KV), "pool"
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    verifier: str = "prompt"  # "continue": ask on top of each branch's own KV (block pool only)

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
    Condition("rksc", "everything on: sharing, block pool engine, verifier as a continuation of each branch, CGEE",
              "pool", needs=frozenset({"sharing", "pool"}), uses=frozenset({"cgee"}), verifier="continue"),
    Condition("kv-only", "ablation: sharing and block pool with the paper's separate verifier prompt, no CGEE",
              "pool", needs=frozenset({"sharing", "pool"})),
    Condition("cgee-only", "ablation: CGEE without prefix sharing", "none", needs=frozenset({"cgee"})),
)}
DEFAULT_CONDITIONS = ("naive", "nokv", "prefix", "rksc")


def schedule(problems: int, conditions: list[str], block: int = 1) -> list[tuple[list[int], str]]:
    """Interleaved order in blocks of `block` problems: every condition on block 0, then on block 1, ..."""
    starts = range(0, problems, block)
    return [(list(range(s, min(s + block, problems))), c) for s in starts for c in conditions]
