"""rksc's compiled kernels: each equals a float64 reference within fp32 rounding, and a row's result does
not depend on the rows computed beside it, nor on the thread count (the engine's batch invariance)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rksc.kernels import attention, gemm, ops

needs_rksc_kernel = pytest.mark.skipif(not gemm.available(), reason=f"rksc's kernel: {gemm.status().error}")
needs_attention = pytest.mark.skipif(not attention.available(), reason=f"rksc's kernel: {attention.status().error}")
TOL = dict(rtol=1e-5, atol=1e-5)  # an fp32 result against the float64 reference


def bf16_weight(n, k, seed=0, scale=0.05):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16().float()


def reference(x, w, bias=None):
    y = x.double() @ w.double().T
    return (y if bias is None else y + bias.double()).float()


@needs_rksc_kernel
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 90), k=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 99),
       fmt=st.sampled_from(["fp16", "int8"]))
def test_rksc_kernel_rows_do_not_depend_on_their_batch_or_the_threads(m, n, k, bias, seed, fmt):
    w = bf16_weight(n, k, seed)
    panels, scale = gemm.pack(w) if fmt == "fp16" else gemm.quantize(w)
    if fmt == "int8":  # the product of the weights int8 holds (the rounding itself: tests/test_weights.py)
        w = gemm.unpack(panels, n, scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = gemm.matmul(x, panels, n, scale, b, threads=2)
    assert torch.allclose(y, reference(x, w, b), **TOL)
    alone = torch.cat([gemm.matmul(x[i:i + 1], panels, n, scale, b, threads=1) for i in range(m)])
    assert torch.equal(y, alone)
    strided = torch.randn(m, k + 5, generator=g)[:, :k]  # rows that are not contiguous with each other
    assert torch.equal(gemm.matmul(strided, panels, n, scale, b), gemm.matmul(strided.contiguous(), panels, n, scale, b))


@needs_attention
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 7]),
       dim=st.sampled_from([8, 64, 72, 256]), block_size=st.sampled_from([1, 4, 16]),
       window=st.sampled_from([None, 1, 5, 40]), shared=st.integers(0, 60), seed=st.integers(0, 99))
def test_decode_attention_equals_softmax_attention_and_rows_do_not_depend_on_each_other(
        rows, kv_heads, group, dim, block_size, window, shared, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [shared + int(torch.randint(1, 30, (1,), generator=g)) for _ in range(rows)]
    shared_blocks = shared // block_size  # full blocks of the common prefix are one set of block ids
    tables, next_block = [], shared_blocks
    for n in lengths:
        own = (n + block_size - 1) // block_size - shared_blocks
        tables.append(list(range(shared_blocks)) + list(range(next_block, next_block + own)))
        next_block += own
    width = max(len(t) for t in tables)
    t32 = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_pool = torch.randn(next_block * block_size, kv_heads, dim, generator=g)
    v_pool = torch.randn(next_block * block_size, kv_heads, dim, generator=g)
    q = torch.randn(rows, kv_heads * group, dim, generator=g) * 2
    lens = torch.tensor(lengths, dtype=torch.int32)
    probs = torch.zeros(rows, kv_heads * group, width * block_size)
    out = attention.decode(q, k_pool, v_pool, t32, lens, block_size, dim ** -0.5, window, probs, threads=2)
    want, want_probs = attention.reference(q, k_pool, v_pool, t32, lens, block_size, dim ** -0.5, window)
    assert torch.allclose(out, want, **TOL)
    for b, p in enumerate(want_probs):
        assert torch.allclose(probs[b, :, :lengths[b]].double(), p, rtol=1e-5, atol=1e-6)
        assert not probs[b, :, lengths[b]:].any()
    alone = torch.cat([attention.decode(q[b:b + 1], k_pool, v_pool, t32[b:b + 1], lens[b:b + 1], block_size,
                                        dim ** -0.5, window, threads=1) for b in range(rows)])
    assert torch.equal(out, alone)
    strided = torch.randn(kv_heads * group, rows, dim, generator=g).transpose(0, 1)  # rows not contiguous
    assert torch.equal(attention.decode(strided, k_pool, v_pool, t32, lens, block_size, 0.1, window),
                       attention.decode(strided.contiguous(), k_pool, v_pool, t32, lens, block_size, 0.1, window))


@needs_rksc_kernel
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 40), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       tiny=st.booleans(), seed=st.integers(0, 99))
def test_compiled_packing_equals_the_torch_packing_and_holds_every_weight(n, k, dtype, tiny, seed):
    w = bf16_weight(n, k, seed)
    if tiny:
        w[seed % n, seed % k] = 2.0 ** -30  # that row needs a power-of-two scale
    w = w.to(dtype)
    panels, scale = gemm.pack(w)
    want_panels, want_scale = gemm._pack(None, w)  # the same packing in torch ops
    assert torch.equal(panels, want_panels)
    assert (scale is None) == (want_scale is None) and (scale is None or torch.equal(scale, want_scale))
    assert torch.equal(gemm.unpack(panels, n, scale), w.float())


needs_ops = pytest.mark.skipif(not ops.available(), reason=f"rksc's ops: {ops.status().error}")


@needs_ops
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 700), n=st.integers(1, 80), heads=st.integers(1, 4), seed=st.integers(0, 99))
def test_layer_ops_equal_their_torch_forms_and_rows_do_not_depend_on_each_other(rows, n, heads, seed):
    g = torch.Generator().manual_seed(seed)
    x, y, w = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g), torch.randn(n, generator=g)
    norm = ops.rms_norm(x, w, 1e-6)
    assert torch.allclose(norm, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, **TOL)
    total, out = ops.add_rms_norm(x, y, w, 1e-5, offset=1.0)
    assert torch.equal(total, x + y)
    assert torch.allclose(out, (x + y) * torch.rsqrt((x + y).pow(2).mean(-1, keepdim=True) + 1e-5) * (w + 1), **TOL)
    gu = torch.randn(rows, 2 * n, generator=g) * 5
    act = ops.silu_mul(gu)
    assert torch.allclose(act, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], **TOL)
    d = 2 * (n // 2 + 1)  # an even head size
    qkv = torch.randn(rows, (heads + 1) * d, generator=g)
    cos, sin = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    want = ops.reference_rope(qkv, cos, sin, heads, d)
    rotated = qkv.clone()
    ops.rope(rotated, cos, sin, heads, d)
    assert torch.allclose(rotated, want, **TOL) and torch.equal(rotated[:, heads * d:], qkv[:, heads * d:])
    one = rows - 1  # the last row alone gives the same bits as in the batch (the ops go parallel above 32k values)
    assert torch.equal(ops.rms_norm(x[one:], w, 1e-6), norm[one:])
    assert torch.equal(ops.silu_mul(gu[one:]), act[one:])
    assert torch.equal(ops.add_rms_norm(x[one:], y[one:], w, 1e-5, offset=1.0)[1], out[one:])
