"""Torch-free bookkeeping for a paged, prefix-sharing KV block pool (RSBCM) and its eviction policies."""

from rksc.cache.blocks import (Block, BlockPool, BlockTable, Copy, PoolExhausted, PoolStats, Slot,
                               blocks_for_budget, bytes_per_block)
from rksc.cache.policies import POLICIES, LRUPolicy, Policy, RKSCPolicy

__all__ = ["POLICIES", "Block", "BlockPool", "BlockTable", "Copy", "LRUPolicy", "Policy", "PoolExhausted",
           "PoolStats", "RKSCPolicy", "Slot", "blocks_for_budget", "bytes_per_block"]
