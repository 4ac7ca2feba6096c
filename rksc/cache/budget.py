"""How many pool blocks a KV budget in bytes buys: the one place block size meets model shape.

`bytes_per_block` is what one block costs across every layer, K and V; `blocks_for_budget` turns a
budget into a block count, and refuses (RkscError) a budget smaller than one block.
"""

from __future__ import annotations

from rksc.errors import RkscError


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype_bytes: int) -> int:
    """Bytes one block holds across all layers, K and V."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
    assert bytes_per_block > 0, bytes_per_block
    if budget_bytes < bytes_per_block:
        raise RkscError(f"KV budget of {budget_bytes} bytes is smaller than one block "
                        f"({bytes_per_block} bytes); raise the budget or shrink the block size")
    return budget_bytes // bytes_per_block
