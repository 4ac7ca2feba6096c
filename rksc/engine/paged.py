"""Model execution over the paged block pool: KV lives once in pool blocks, branches share them.

`PagedKV` owns the pool tensors (per layer K and V, [num_blocks * block_size, H_kv, D]); the
torch-free `BlockPool` decides which slots hold which tokens. Each model call is packed: the new
tokens of all rows form one sequence [1, N] (no padding), and a registered attention function,
`rksc_paged`, writes their K/V into the pool and attends each row over its own context:

- rows with several new tokens (prompt processing): per row, causal attention over its slots;
- one new token per row (decode): in float32, rksc's compiled kernel (rksc.kernels.attention), one
  call per layer: each row over its own block table, in position order, rows sharing a prefix reading
  the same cached blocks. Otherwise (a bf16 pool, no compiler) cascade attention: the blocks common to
  every row (the shared problem prefix) are read once for the whole batch as one product; each row's
  own blocks are read separately; the two parts are merged exactly with their log-sum-exp.

Position ids stay logical per row, so the arithmetic that reaches a token is the plain model's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rksc.cache import BlockTable, Copy
from rksc.kernels import attention as kernel

ATTENTION = "rksc_paged"


class PagedKV:
    """The pool's tensors. Memory is reserved up front but pages are touched only when written,
    unless `commit` touched them all (the server does, so its resident memory stays flat)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.k = [torch.empty(slots, kv_heads, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(slots, kv_heads, head_dim, dtype=dtype) for _ in range(num_layers)]

    def commit(self) -> int:
        """Write every page of the pool now; returns the bytes committed."""
        for t in (*self.k, *self.v):
            t.zero_()
        return sum(t.nbytes for t in (*self.k, *self.v))

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
class QueryRow:
    start: int  # first packed query index of this row
    stop: int
    table: BlockTable  # the row's sequence; its KV context is every slot of the table
    positions: torch.Tensor  # [T] logical positions of the row's new tokens (context slot i is position i);
    # increasing, not necessarily contiguous (an approximate prefill recomputes some tokens only)
    block_size: int

    @cached_property
    def context(self) -> torch.Tensor:
        return torch.tensor(slot_ids(self.table, 0, self.table.num_tokens, self.block_size))


@dataclass
class Segment:
    """A run of context slots shared by several decode rows: read once for all of them."""

    slots: slice | torch.Tensor  # [S] pool slots, in position order
    rows: slice | torch.Tensor | None  # the rows that share it (a range, or indices); None: every row
    start: int  # logical position of its first slot


@dataclass
class Forward:
    """Everything `rksc_paged` needs for one model call."""

    kv: PagedKV
    write: torch.Tensor  # [N] slot for each packed new token
    rows: list[QueryRow]
    segments: list[Segment] = field(default_factory=list)  # decode only: shared runs of context
    own: torch.Tensor | None = None  # decode only: [B, Lo] each row's remaining slots, padded
    own_bias: torch.Tensor | None = None  # [B, 1, 1, Lo] 0 for valid slots, -inf for padding
    own_start: torch.Tensor | None = None  # [B] logical position of each row's first own slot
    q_pos: torch.Tensor | None = None  # decode only: [B] position of each row's new token
    record_layer: int | None = None  # layer whose attention probabilities feed the eviction policy
    attention_mass: tuple[list[torch.Tensor], torch.Tensor] | None = None  # ([S] per segment, [B, Lo])
    window_biases: dict | None = None  # window -> (own, per-segment) masks, built once per call
    tables: torch.Tensor | None = None  # decode on the kernel: [B, W] int32 block ids of each row
    lengths: torch.Tensor | None = None  # [B] int32 context length of each row, its new token included
    block_mass: torch.Tensor | None = None  # [num_blocks] attention mass per block (record layer, kernel path)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, rksc: Forward | None = None, **kwargs):
    # query: [1, Hq, N, D]; key, value: [1, Hkv, N, D] for the N packed new tokens
    assert rksc is not None, "rksc_paged attention needs the Forward description (rksc=...)"
    layer, kv = module.layer_idx, rksc.kv
    kv.k[layer].index_copy_(0, rksc.write, key[0].transpose(0, 1))
    kv.v[layer].index_copy_(0, rksc.write, value[0].transpose(0, 1))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if rksc.tables is not None:
        return _kernel_decode(query, kv.k[layer], kv.v[layer], rksc, scale, layer, sliding_window), None
    if rksc.own is not None:
        out = _cascade(query, kv.k[layer], kv.v[layer], rksc, scale, layer, sliding_window)
    else:
        out = torch.cat([_row(query, key, value, kv.k[layer], kv.v[layer], r, scale, sliding_window)
                         for r in rksc.rows], 2)
    return out.transpose(1, 2).contiguous(), None  # [1, N, Hq, D]


def _kernel_decode(query, k_pool, v_pool, fwd: Forward, scale: float, layer: int, window: int | None) -> torch.Tensor:
    q = query[0].transpose(0, 1)  # [B, Hq, D], a view
    probs = None
    if fwd.record_layer == layer:
        probs = torch.zeros(q.shape[0], q.shape[1], fwd.tables.shape[1] * fwd.kv.block_size)
    out = kernel.decode(q, k_pool, v_pool, fwd.tables, fwd.lengths, fwd.kv.block_size, scale, window, probs)
    if probs is not None:  # mass per block: summed over heads and rows
        per_position = probs.sum(1)  # [B, W * bs]
        blocks = fwd.tables.long().repeat_interleave(fwd.kv.block_size, dim=1)  # [B, W * bs]
        num_blocks = k_pool.shape[0] // fwd.kv.block_size
        fwd.block_mass = torch.zeros(num_blocks).index_add_(0, blocks.flatten(), per_position.flatten())
    return out[None]  # [1, B, Hq, D]


def _row(query, key, value, k_pool, v_pool, row: QueryRow, scale: float, window: int | None) -> torch.Tensor:
    q = query[:, :, row.start:row.stop]  # [1, Hq, T, D]
    gqa = q.shape[1] != key.shape[1]
    if int(row.positions[0]) == 0 and int(row.positions[-1]) == len(row.positions) - 1 and (
            not window or len(row.positions) <= window):
        # positions 0..T-1, nothing before them: plain causal attention over them, no gather, no mask
        k, v = key[:, :, row.start:row.stop], value[:, :, row.start:row.stop]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    k = _gather(k_pool, row.context).transpose(0, 1)[None]  # [1, Hkv, L, D]
    v = _gather(v_pool, row.context).transpose(0, 1)[None]
    ctx_pos = torch.arange(len(row.context))
    mask = ctx_pos[None, :] <= row.positions[:, None]  # [T, L]
    if window:
        mask &= ctx_pos[None, :] > row.positions[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scale, enable_gqa=gqa)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns (output, logsumexp)


def _gather(pool: torch.Tensor, slots: slice | torch.Tensor) -> torch.Tensor:
    """pool[slots] for a slice (a view) or an index tensor of any shape; index_select copies rows
    several times faster than advanced indexing on this CPU."""
    if isinstance(slots, slice):
        return pool[slots]
    return torch.index_select(pool, 0, slots.flatten()).view(*slots.shape, *pool.shape[1:])


def _window_biases(fwd: Forward, window: int, g: int, dtype) -> tuple[torch.Tensor, list]:
    """Additive masks hiding keys more than `window` positions behind each row's query: the own part
    [B, 1, 1, Lo], and per segment [1, 1, r*g, S] (None when the window hides nothing of it)."""
    low = fwd.q_pos - window  # keys at positions <= low are outside the window
    own_pos = fwd.own_start[:, None] + torch.arange(fwd.own.shape[1])[None, :]
    hide = torch.zeros((), dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
    own = fwd.own_bias + torch.where(own_pos > low[:, None], *hide)[:, None, None, :]
    segments = []
    for seg in fwd.segments:
        rows_low = low if seg.rows is None else low[seg.rows]
        if int(rows_low.min()) < seg.start:
            segments.append(None)
            continue
        length = _length(seg.slots)
        bias = torch.where(seg.start + torch.arange(length)[None, :] > rows_low[:, None], *hide)  # [r, S]
        segments.append(bias.repeat_interleave(g, dim=0)[None, None])
    return own, segments


def _length(slots: slice | torch.Tensor) -> int:
    return slots.stop - slots.start if isinstance(slots, slice) else len(slots)


def _cascade(query, k_pool, v_pool, fwd: Forward, scale: float, layer: int,
             window: int | None = None) -> torch.Tensor:
    """Decode attention: each row's own slots in one padded batch, each shared segment once for all
    the rows that share it, merged exactly by log-sum-exp."""
    _, hq, rows, d = query.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    own_bias, seg_biases = fwd.own_bias, [None] * len(fwd.segments)
    if window:  # every sliding layer of this call uses the same masks
        fwd.window_biases = fwd.window_biases or {}
        if window not in fwd.window_biases:
            fwd.window_biases[window] = _window_biases(fwd, window, g, k_pool.dtype)
        own_bias, seg_biases = fwd.window_biases[window]
    q = query[0].transpose(0, 1).reshape(rows, hkv, g, d)  # [B, Hkv, g, D]: a row's g heads share a KV head
    ko = _gather(k_pool, fwd.own).transpose(1, 2)  # [B, Hkv, Lo, D]
    vo = _gather(v_pool, fwd.own).transpose(1, 2)
    out, lse = _flash(q, ko, vo, 0.0, False, attn_mask=own_bias, scale=scale)  # lse: [B, Hkv, g]
    out = out.float()
    shared_keys = []
    for seg, bias in zip(fwd.segments, seg_biases):
        ks = _gather(k_pool, seg.slots).transpose(0, 1)[None]  # [1, Hkv, S, D]
        vs = _gather(v_pool, seg.slots).transpose(0, 1)[None]
        shared_keys.append(ks)
        qr = q if seg.rows is None else q[seg.rows]
        r = qr.shape[0]
        qs = qr.permute(1, 0, 2, 3).reshape(1, hkv, r * g, d)  # the segment's queries: r*g heads per KV head
        out_s, lse_s = _flash(qs, ks, vs, 0.0, False, attn_mask=bias, scale=scale)
        out_s = out_s[0].reshape(hkv, r, g, d).transpose(0, 1).float()  # [r, Hkv, g, D]
        lse_s = lse_s[0].reshape(hkv, r, g).transpose(0, 1)
        if bias is not None:  # a row whose window hides the whole segment takes nothing from it
            hidden = torch.isinf(bias[0, 0]).all(-1).reshape(r, g)[:, None, :].expand_as(lse_s)
            lse_s = lse_s.masked_fill(hidden, float("-inf"))
            out_s = out_s.masked_fill(hidden[..., None], 0.0)
        if seg.rows is None:
            out, lse = _merge(out, lse, out_s, lse_s)
        else:
            out[seg.rows], lse[seg.rows] = _merge(out[seg.rows], lse[seg.rows], out_s, lse_s)
    if fwd.record_layer == layer:
        fwd.attention_mass = _mass(q, ko, shared_keys, fwd.segments, lse, own_bias, scale, seg_biases)
    return out.to(query.dtype).reshape(rows, hq, d).transpose(0, 1)[None]  # [1, Hq, B, D]


def _merge(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each one's output and log-sum-exp."""
    total = torch.logaddexp(lse_a, lse_b)
    total_safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    out = out_a * torch.exp(lse_a - total_safe)[..., None] + out_b * torch.exp(lse_b - total_safe)[..., None]
    return out, total


def _mass(q, ko, shared_keys, segments, lse, own_bias, scale, seg_biases) -> tuple[list, torch.Tensor]:
    """Attention probability each key received, summed over heads and rows: ([S] per segment, [B, Lo])."""
    qf = q.float()
    own = torch.exp(torch.einsum("bhgd,bhld->bhgl", qf, ko.float()) * scale + own_bias.float() - lse[..., None])
    shared = []
    for ks, seg, bias in zip(shared_keys, segments, seg_biases):
        idx = slice(None) if seg.rows is None else seg.rows
        qr, lr = qf[idx], lse[idx]
        s = torch.einsum("bhgd,hsd->bhgs", qr, ks[0].float()) * scale
        if bias is not None:
            r, _, g, _ = qr.shape
            s = s + bias[0, 0].reshape(r, 1, g, -1).float()
        shared.append(torch.exp(s - lr[..., None]).sum(dim=(0, 1, 2)))
    return shared, own.sum(dim=(1, 2))


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
