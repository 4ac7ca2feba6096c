"""fp16 or int8 weights, fp32 products: rksc's compiled kernel (gemm.cpp) through ctypes.

    panels, scale = pack(weight)            # [N, K] -> [ceil(N/8), K, 8] float16, [N] or None
    y = matmul(x, panels, n, scale, bias)   # x [M, K] float32 -> y [M, N] float32
    panels, scale = quantize(weight)        # [N, K] -> [ceil(N/8), K, 8] int8, steps per 32 weights (lossy)
    y = matmul(x, panels, n, scale, bias)   # the same call: the panels' dtype picks the kernel

Each output element is one fp32 FMA chain over K, so a row's product is bit for bit the same
whatever batch it is computed in and however many threads run. `status()` builds the library on
first use and checks it on a probe product before anything relies on it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from rksc.kernels import build
from rksc.kernels.machine import F16_KERNEL_FLAGS, cpu_flags

_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]


@functools.cache
def status() -> build.Build:
    """The compiled library, checked on a probe product (`error` set when it cannot be used)."""
    missing = F16_KERNEL_FLAGS - cpu_flags()
    if missing:  # running it would stop the process with an illegal instruction
        return build.Build("gemm", error=f"this CPU lacks {', '.join(sorted(missing)).upper()}")
    b = build.load("gemm")
    if b.library is None:
        return b
    for name in ("rksc_f16_gemm", "rksc_i8_gemm"):
        fn = getattr(b.library, name)
        fn.argtypes, fn.restype = _ARGS, None
    for name in ("rksc_f16_pack_bf16", "rksc_f16_pack_f32"):
        pack_fn = getattr(b.library, name)
        pack_fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int]
        pack_fn.restype = ctypes.c_int64
    problem = _probe(b.library)
    if problem:
        b.library, b.error = None, problem
    return b


def available() -> bool:
    return status().library is not None


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, K] weight -> ([ceil(N/8), K, 8] float16 panels, per-row power-of-two scales [N] or None), which
    hold every weight exactly; raises ValueError when a row spans more binades than that allows (no
    weight of the shipped models comes near)."""
    return _pack(status().library, weight)


def _pack(lib, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = weight.shape
    w = weight.detach()
    if lib is None or w.dtype not in (torch.bfloat16, torch.float32):
        half, scale = fp16_rows(w)
        return panel(half), scale
    w = w.contiguous()
    fn = lib.rksc_f16_pack_bf16 if w.dtype == torch.bfloat16 else lib.rksc_f16_pack_f32
    panels = torch.empty((n + 7) // 8, k, 8, dtype=torch.float16)
    if fn(w.data_ptr(), n, k, None, panels.data_ptr(), torch.get_num_threads()) == 0:
        return panels, None
    _, scale = fp16_rows(w)  # some rows need a power of two: find them, then pack again scaled
    inverse = (1.0 / scale).contiguous()
    if fn(w.data_ptr(), n, k, inverse.data_ptr(), panels.data_ptr(), torch.get_num_threads()) != 0:
        raise AssertionError("a scaled row still has no exact float16 value")
    return panels, scale


def fp16_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight` as float16 rows times power-of-two scales (None: every row as it is), exactly."""
    w = weight.detach().float()
    half = w.half()
    inexact = (half.float() != w).any(dim=1)
    if not inexact.any():
        return half, None
    _, exponent = torch.frexp(w.abs().amax(dim=1))  # a row's max |w| is in [2^(e-1), 2^e)
    ones = torch.ones(w.shape[0])
    scale = torch.where(inexact, torch.ldexp(ones, exponent - 15), ones)  # a row's max below 2^15
    scaled = w / scale[:, None]
    half = scaled.half()
    changed = half.float() != scaled
    if changed.any():
        raise ValueError(f"{int(changed.sum())} of {w.numel()} weights have no exact float16 value, even scaled "
                         "by a power of two per row")
    return half, scale.contiguous()


GROUP = 32  # int8 weights per step, along K (gemm.cpp's QG)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> ([ceil(N/8), K, 8] int8 panels, [ceil(N/8), ceil(K/32), 8] float32 steps): each run of
    32 weights of a row (as llama.cpp's Q8_0 blocks) rounded to the nearest multiple of its step, its largest
    magnitude / 127 (symmetric), so no weight moves by more than half a step. Lossy: `unpack(panels, n,
    steps)` is the weight the products use."""
    n, k = weight.shape
    groups = -(-k // GROUP)
    w = torch.zeros(n, groups * GROUP)
    w[:, :k] = weight.detach().float()
    w = w.view(n, groups, GROUP)
    step = w.abs().amax(dim=2) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round(w / step[:, :, None]).clamp_(-127, 127).to(torch.int8).view(n, -1)[:, :k]
    return panel(q), panel(step)


def panel(rows: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/8), K, 8] panels of the same dtype (rows past N are zeros)."""
    n, k = rows.shape
    padded = torch.zeros((n + 7) // 8 * 8, k, dtype=rows.dtype)
    padded[:n] = rows
    return padded.view(-1, 8, k).transpose(1, 2).contiguous()


def unpanel(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The [N, K] rows held by `panels`, in their own dtype."""
    p, k, _ = panels.shape
    return panels.transpose(1, 2).reshape(p * 8, k)[:n]  # also unpanels int8 steps: [P, G, 8] -> [N, G]


def unpack(panels: torch.Tensor, n: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] float32 weight held by `panels` and `scale` (fp16: per-row powers of two or None; int8:
    steps per 32 weights, as `quantize` gives them)."""
    w = unpanel(panels, n).float()
    if panels.dtype == torch.int8:
        k = w.shape[1]
        return w * unpanel(scale, n).repeat_interleave(GROUP, dim=1)[:, :k]
    return w if scale is None else w * scale[:, None]


def matmul(x: torch.Tensor, panels: torch.Tensor, n: int, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, elements contiguous) -> x @ W.T * scale + bias, [M, N] float32,
    W held by fp16 or int8 `panels` (int8 needs its steps as `scale`)."""
    lib = status().library
    fn = lib.rksc_i8_gemm if panels.dtype == torch.int8 else lib.rksc_f16_gemm
    return _matmul(fn, x, panels, n, scale, bias, threads)


def _matmul(fn, x, panels, n, scale, bias, threads):
    m, k = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and panels.shape[1] == k, (x.dtype, x.stride(), panels.shape)
    y = torch.empty(m, n, dtype=torch.float32)
    fn(x.data_ptr(), m, k, x.stride(0), panels.data_ptr(), n, None if scale is None else scale.data_ptr(),
       None if bias is None else bias.data_ptr(), y.data_ptr(), n, threads or torch.get_num_threads())
    return y


def _probe(lib) -> str | None:
    """None when the kernel computes x @ W.T * scale + bias within fp32 rounding and a row's result
    does not depend on its batch; else what is wrong."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 53, generator=g) * 0.1).bfloat16().float()
    w[3, 5] = 2.0 ** -30  # a row that needs a scale
    x, bias = torch.randn(11, 53, generator=g), torch.randn(37, generator=g)
    fn = lib.rksc_f16_gemm
    try:
        panels, scale = _pack(lib, w)
        y = _matmul(fn, x, panels, 37, scale, bias, 2)
        alone = torch.cat([_matmul(fn, x[i:i + 1], panels, 37, scale, bias, 1) for i in range(11)])
    except Exception as e:  # an illegal instruction cannot be caught (the flags are checked first); a ctypes error can
        return f"the compiled kernel failed on a probe: {e}"
    if not torch.equal(unpack(panels, 37, scale), w):
        return "the compiled kernel packed wrong weights on a probe"
    reference = (x.double() @ w.double().T + bias.double()).float()
    if scale is None or not torch.allclose(y, reference, rtol=1e-5, atol=1e-5):
        return "the compiled kernel gave wrong products on a probe"
    if not torch.equal(y, alone):
        return "the compiled kernel's rows depend on their batch on a probe"
    try:
        panels, scale = quantize(w)
        y = _matmul(lib.rksc_i8_gemm, x, panels, 37, scale, bias, 2)
    except Exception as e:
        return f"the compiled int8 kernel failed on a probe: {e}"
    reference = (x.double() @ unpack(panels, 37, scale).double().T + bias.double()).float()
    if not torch.allclose(y, reference, rtol=1e-5, atol=1e-5):
        return "the compiled int8 kernel gave wrong products on a probe"
    return None
