"""Decode attention over the paged KV pool in one call per layer: rksc's compiled kernel (attention.cpp).

    out = decode(q, k_pool, v_pool, tables, lengths, block_size, scale, window)

q [B, Hq, D] float32 (one new token per row; rows and heads may be strided), pools [slots, Hkv, D]
float32, tables [B, W] int32 block ids, lengths [B] int32 context lengths (the new token included);
out [B, Hq, D]. A row attends to positions [max(0, len - window), len) of its own table, in order,
so its result does not depend on the other rows. `status()` builds the library on first use and
checks it against a plain softmax attention before anything relies on it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from rksc.kernels import build
from rksc.kernels.machine import F16_KERNEL_FLAGS, cpu_flags

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ARGS = [_P, _I, _I, _P, _P, _I, _I, _P, _I, _P, _I, _I, _I, _F, _I, _P, _I, _P, _I, _I, ctypes.c_int]


@functools.cache
def status() -> build.Build:
    missing = F16_KERNEL_FLAGS - cpu_flags()
    if missing:
        return build.Build("attention", error=f"this CPU lacks {', '.join(sorted(missing)).upper()}")
    b = build.load("attention")
    if b.library is None:
        return b
    fn = b.library.rksc_decode_attention
    fn.argtypes, fn.restype = _ARGS, None
    problem = _probe(fn)
    if problem:
        b.library, b.error = None, problem
    return b


def available() -> bool:
    return status().library is not None


def supports(pool: torch.Tensor) -> bool:
    """Whether a pool of this dtype and head size runs on the kernel."""
    return pool.dtype == torch.float32 and pool.shape[-1] % 8 == 0 and available()


def decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
           block_size: int, scale: float, window: int | None = None, probs: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """Attention output [B, Hq, D]; with `probs` ([B, Hq, W * block_size] float32, zeros) the normalised
    attention probabilities are written into it."""
    return _decode(status().library.rksc_decode_attention, q, k_pool, v_pool, tables, lengths, block_size, scale,
                   window, probs, threads)


def _decode(fn, q, k_pool, v_pool, tables, lengths, block_size, scale, window, probs, threads):
    rows, q_heads, dim = q.shape
    assert q.dtype == k_pool.dtype == torch.float32 and q.stride(2) == 1, (q.dtype, q.stride())
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and tables.dtype == lengths.dtype == torch.int32
    assert tables.is_contiguous() and lengths.is_contiguous() and k_pool.shape[-1] == dim
    out = torch.empty(rows, q_heads, dim, dtype=torch.float32)
    if probs is not None:
        assert probs.dtype == torch.float32 and probs.is_contiguous() and probs.shape[:2] == (rows, q_heads)
    fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.shape[1], dim,
       tables.data_ptr(), tables.shape[1], lengths.data_ptr(), rows, block_size, q_heads, scale, window or 0,
       out.data_ptr(), q_heads * dim, None if probs is None else probs.data_ptr(),
       0 if probs is None else probs.stride(0), 0 if probs is None else probs.stride(1),
       threads or torch.get_num_threads())
    return out


def reference(q, k_pool, v_pool, tables, lengths, block_size, scale, window=None) -> tuple[torch.Tensor, list]:
    """The same attention with plain torch ops in float64: (out [B, Hq, D], probabilities per row [Hq, L])."""
    rows, q_heads, dim = q.shape
    g = q_heads // k_pool.shape[1]
    outs, probs = [], []
    for b in range(rows):
        n = int(lengths[b])
        lo = max(0, n - window) if window else 0
        pos = torch.arange(lo, n)
        slots = tables[b].long()[pos // block_size] * block_size + pos % block_size
        k = k_pool[slots].double().repeat_interleave(g, dim=1)  # [L, Hq, D]
        v = v_pool[slots].double().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), k) * scale
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v))
        full = torch.zeros(q_heads, n, dtype=torch.float64)
        full[:, lo:] = p
        probs.append(full)
    return torch.stack(outs).float(), probs


def _probe(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    bs, rows, kv, q_heads, dim = 4, 3, 2, 6, 16
    k_pool, v_pool = torch.randn(64, kv, dim, generator=g), torch.randn(64, kv, dim, generator=g)
    tables = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 5, 6, 7], [8, 9, 10, 11, 12]], dtype=torch.int32)
    lengths = torch.tensor([17, 11, 20], dtype=torch.int32)
    q = torch.randn(rows, q_heads, dim, generator=g)
    try:
        out = _decode(fn, q, k_pool, v_pool, tables, lengths, bs, 0.25, 7, None, 2)
        alone = torch.cat([_decode(fn, q[b:b + 1], k_pool, v_pool, tables[b:b + 1], lengths[b:b + 1], bs, 0.25, 7,
                                   None, 1) for b in range(rows)])
    except Exception as e:
        return f"the compiled attention failed on a probe: {e}"
    if not torch.allclose(out, reference(q, k_pool, v_pool, tables, lengths, bs, 0.25, 7)[0], rtol=1e-5, atol=1e-5):
        return "the compiled attention gave wrong outputs on a probe"
    if not torch.equal(out, alone):
        return "the compiled attention's rows depend on their batch on a probe"
    return None
