"""Model execution over the paged block pool: KV lives once in pool blocks, branches share them.

`PagedKV` owns the pool tensors (per layer K and V, [num_blocks * block_size, H_kv, D]); the
torch-free `BlockPool` decides which slots hold which tokens. Each model call is packed: the new
tokens of all rows form one sequence [1, N] (no padding), and a registered attention function,
`rksc_paged`, writes their K/V into the pool and attends each row over its own context:

- rows with several new tokens (prompt processing): per row, causal attention over its slots;
- one new token per row (decode): cascade attention. The blocks common to every row (the shared
  problem prefix) are read once for the whole batch as one product; each row's own blocks are
  read separately; the two parts are merged exactly with their log-sum-exp.

Position ids stay logical per row, so the arithmetic that reaches a token is the plain model's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rksc.cache import BlockPool, BlockTable, Copy

ATTENTION = "rksc_paged"


class PagedKV:
    """The pool's tensors. Memory is reserved up front but pages are touched only when written."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.k = [torch.empty(slots, kv_heads, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(slots, kv_heads, head_dim, dtype=dtype) for _ in range(num_layers)]

    def copy(self, c: Copy) -> None:
        bs = self.block_size
        src, dst = slice(c.src * bs, c.src * bs + c.num_tokens), slice(c.dst * bs, c.dst * bs + c.num_tokens)
        for k, v in zip(self.k, self.v):
            k[dst] = k[src]
            v[dst] = v[src]


def slot_ids(table: BlockTable, start: int, stop: int, block_size: int) -> list[int]:
    """Flat pool slot of every token position in [start, stop) of a sequence."""
    return [table.blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]


@dataclass
class Row:
    start: int  # first packed query index of this row
    stop: int
    context: torch.Tensor  # [L] flat slots of the whole context, current tokens included
    positions: torch.Tensor  # [T] logical positions of the row's new tokens (context slot i is position i)


@dataclass
class Forward:
    """Everything `rksc_paged` needs for one model call."""

    kv: PagedKV
    write: torch.Tensor  # [N] slot for each packed new token
    rows: list[Row]
    shared: torch.Tensor | None = None  # decode only: [S] slots common to every row
    own: torch.Tensor | None = None  # decode only: [B, Lo] each row's remaining slots, padded
    own_valid: torch.Tensor | None = None  # [B, Lo] bool
    attention_mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> mass per slot, if asked
    record_layer: int | None = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, rksc: Forward | None = None, **kwargs):
    # query: [1, Hq, N, D]; key, value: [1, Hkv, N, D] for the N packed new tokens
    assert rksc is not None, "rksc_paged attention needs the Forward description (rksc=...)"
    layer, kv = module.layer_idx, rksc.kv
    kv.k[layer][rksc.write] = key[0].transpose(0, 1)
    kv.v[layer][rksc.write] = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if rksc.own is not None and not sliding_window:
        out = _cascade(query, kv.k[layer], kv.v[layer], rksc, scale, layer)
    else:
        out = torch.cat([_row(query, kv.k[layer], kv.v[layer], r, scale, sliding_window) for r in rksc.rows], 2)
    return out.transpose(1, 2).contiguous(), None  # [1, N, Hq, D]


def _row(query, k_pool, v_pool, row: Row, scale: float, window: int | None) -> torch.Tensor:
    q = query[:, :, row.start:row.stop]  # [1, Hq, T, D]
    k = k_pool[row.context].transpose(0, 1)[None]  # [1, Hkv, L, D]
    v = v_pool[row.context].transpose(0, 1)[None]
    ctx_pos = torch.arange(len(row.context))
    mask = ctx_pos[None, :] <= row.positions[:, None]  # [T, L]
    if window:
        mask &= ctx_pos[None, :] > row.positions[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _cascade(query, k_pool, v_pool, fwd: Forward, scale: float, layer: int) -> torch.Tensor:
    _, hq, rows, d = query.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    q = query[0].transpose(0, 1).reshape(rows, hkv, g, d).float()  # [B, Hkv, g, D]
    # own part: [B, Hkv, g, Lo]
    ko = k_pool[fwd.own].float()  # [B, Lo, Hkv, D]
    vo = v_pool[fwd.own].float()
    s_own = torch.einsum("bhgd,blhd->bhgl", q, ko) * scale
    s_own.masked_fill_(~fwd.own_valid[:, None, None, :], float("-inf"))
    m = s_own.amax(-1, keepdim=True)  # every row has at least its new token, so m is finite
    if fwd.shared is not None and len(fwd.shared):
        ks = k_pool[fwd.shared].float()  # [S, Hkv, D], read once for all rows
        vs = v_pool[fwd.shared].float()
        qs = q.permute(1, 0, 2, 3).reshape(hkv, rows * g, d)  # [Hkv, B*g, D]
        s_shared = torch.bmm(qs, ks.permute(1, 2, 0)) * scale  # [Hkv, B*g, S]
        s_shared = s_shared.reshape(hkv, rows, g, -1).permute(1, 0, 2, 3)  # [B, Hkv, g, S]
        m = torch.maximum(m, s_shared.amax(-1, keepdim=True))
        p_shared = torch.exp(s_shared - m)
        o = torch.einsum("bhgs,shd->bhgd", p_shared, vs)
        total = p_shared.sum(-1, keepdim=True)
    else:
        p_shared, o, total = None, 0.0, 0.0
    p_own = torch.exp(s_own - m)
    o = o + torch.einsum("bhgl,blhd->bhgd", p_own, vo)
    total = total + p_own.sum(-1, keepdim=True)
    if fwd.record_layer == layer:
        fwd.attention_mass[layer] = _mass(p_shared, p_own, total)
    out = (o / total).to(query.dtype)  # [B, Hkv, g, D]
    return out.reshape(rows, hq, d).transpose(0, 1)[None]  # [1, Hq, B, D]


def _mass(p_shared, p_own, total) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention probability each key received, summed over heads and rows: ([S], [B, Lo])."""
    shared = None if p_shared is None else (p_shared / total).sum(dim=(0, 1, 2))
    return shared, (p_own / total).sum(dim=(1, 2))


AttentionInterface.register(ATTENTION, paged_attention)


@contextmanager
def attention(model, name: str):
    """Run the model with another attention implementation (the config is shared by all layers)."""
    cfg = model.config.get_text_config()
    before = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = before
