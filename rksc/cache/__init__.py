"""Torch-free bookkeeping for a paged, prefix-sharing KV block pool (RSBCM) and its eviction policies."""

from rksc.cache.blocks import Block, BlockPool, BlockTable, Copy, PoolExhausted, PoolStats, Slot
from rksc.cache.budget import blocks_for_budget, bytes_per_block
from rksc.cache.policies import (DEFAULT_POLICY, POLICIES, LeafPolicy, LRUPolicy, Policy, RKSCPolicy,
                                 pool_args)

__all__ = ["DEFAULT_POLICY", "POLICIES", "Block", "BlockPool", "BlockTable", "Copy", "LRUPolicy", "LeafPolicy",
           "Policy", "PoolExhausted", "PoolStats", "RKSCPolicy", "Slot", "blocks_for_budget",
           "bytes_per_block", "pool_args"]
