"""Eviction policies for the KV block pool: tiny strategy objects that rank evictable blocks.

Contract: `policy.key(block)` returns a sortable value computed only from the block's own fields; the pool
evicts the unreferenced cached block with the smallest key (ties broken by block id, so eviction is
deterministic). Policies hold no state, so one instance can serve any number of pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rksc import validate

if TYPE_CHECKING:
    from rksc.cache.blocks import Block


class Policy(Protocol):
    name: str

    def key(self, block: Block) -> tuple[float, ...]: ...


@dataclass(frozen=True)
class LRUPolicy:
    """Least recently used first."""

    name: str = "lru"

    def key(self, block: Block) -> tuple[float, ...]:
        return (block.last_used,)


@dataclass(frozen=True)
class RKSCPolicy:
    """The paper's priority: attention mass / (depth + 1); lowest priority first, then least recently used.

    Deep, rarely attended branch blocks go before shallow shared-prefix blocks that many branches read.
    """

    name: str = "rksc"

    def key(self, block: Block) -> tuple[float, ...]:
        return (block.attention / (block.depth + 1), block.last_used)


@dataclass(frozen=True)
class LeafPolicy:
    """Least recently used first and, of equally recent blocks, the later ones in their chain first:
    SGLang's rule of evicting radix-tree leaves. Every use of a table touches all its blocks, so a block
    is used at least as recently as the blocks that extend it and leaves after them: eviction does not
    cut cached blocks off from the prefix index (up to equal blocks written twice at once, of which
    only one is indexed)."""

    name: str = "leaf"

    def key(self, block: Block) -> tuple[float, ...]:
        return (block.last_used, -block.position)


POLICIES: dict[str, Policy] = {"lru": LRUPolicy(), "rksc": RKSCPolicy(), "leaf": LeafPolicy()}
# leaf computed the fewest prompt tokens of the three, or tied for fewest, on every stream at 25% and 50% of
# its working set (benchmarks/eviction.py, RESULTS.md "RSBCM measured"); rksc's attention order lost most
DEFAULT_POLICY = "leaf"


def pool_args(kv_budget_bytes=None, block_size=16, evict=None) -> tuple[int | None, int, str]:
    """The block pool's arguments checked: KV bytes, tokens per block, eviction policy (None:
    the default)."""
    return (validate.kv_budget(kv_budget_bytes), validate.integer("block_size", block_size, 1),
            validate.choice("evict", DEFAULT_POLICY if evict is None else evict, tuple(POLICIES)))
