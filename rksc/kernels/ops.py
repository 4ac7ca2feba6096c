"""A decoder layer's small fp32 operations, each one call of rksc's compiled ops.cpp (see there).

    out = rms_norm(x, w, eps)                  # x [R, n]
    total, out = add_rms_norm(x, y, w, eps)    # total = x + y, out = rms_norm(total)
    rope(qkv, cos, sin, heads, head_dim)       # in place, the first `heads` heads of each row
    out = silu_mul(gate_up)                    # [R, 2n] -> [R, n]

Inputs are float32 with contiguous rows. `status()` builds the library on first use and checks every
operation against torch before anything relies on it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from rksc.kernels import build
from rksc.kernels.machine import F16_KERNEL_FLAGS, cpu_flags

_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rksc_rms_norm": [_P, _I, _I, _P, _F, _F, _P, _T],
    "rksc_add_rms_norm": [_P, _P, _I, _I, _P, _F, _F, _P, _P, _T],
    "rksc_rope": [_P, _I, _I, _I, _I, _P, _P, _T],
    "rksc_silu_mul": [_P, _I, _I, _P, _T],
}


@functools.cache
def status() -> build.Build:
    missing = F16_KERNEL_FLAGS - cpu_flags()
    if missing:
        return build.Build("ops", error=f"this CPU lacks {', '.join(sorted(missing)).upper()}")
    b = build.load("ops")
    if b.library is None:
        return b
    for name, args in _SIGNATURES.items():
        fn = getattr(b.library, name)
        fn.argtypes, fn.restype = args, None
    problem = _probe(b.library)
    if problem:
        b.library, b.error = None, problem
    return b


def available() -> bool:
    return status().library is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.float32, x.dtype
    return x if x.is_contiguous() else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, lib=None) -> torch.Tensor:
    x = _rows(x)
    out = torch.empty_like(x)
    n = x.shape[-1]
    (lib or status().library).rksc_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), offset, eps,
                                            out.data_ptr(), torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 lib=None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _rows(x), _rows(y)
    total, out = torch.empty_like(x), torch.empty_like(x)
    n = x.shape[-1]
    (lib or status().library).rksc_add_rms_norm(x.data_ptr(), y.data_ptr(), x.numel() // n, n, weight.data_ptr(),
                                                offset, eps, total.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return total, out


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int, lib=None) -> None:
    """Rotate, in place, the first `heads` heads of every row of qkv [R, width] by cos, sin [R, head_dim]."""
    assert qkv.dtype == cos.dtype == sin.dtype == torch.float32 and qkv.is_contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    rows = qkv.shape[0]
    assert cos.shape == sin.shape == (rows, head_dim), (cos.shape, rows, head_dim)
    (lib or status().library).rksc_rope(qkv.data_ptr(), rows, qkv.shape[1], heads, head_dim, cos.data_ptr(),
                                        sin.data_ptr(), torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor, lib=None) -> torch.Tensor:
    gate_up = _rows(gate_up)
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=torch.float32)
    (lib or status().library).rksc_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * n), n, out.data_ptr(),
                                            torch.get_num_threads())
    return out


def reference_rope(qkv: torch.Tensor, cos, sin, heads: int, head_dim: int) -> torch.Tensor:
    """What `rope` computes, in torch ops (the models' own rotate-half form)."""
    out = qkv.clone()
    x = qkv[:, :heads * head_dim].view(-1, heads, head_dim)
    half = head_dim // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out[:, :heads * head_dim] = (x * cos[:, None] + turned * sin[:, None]).reshape(-1, heads * head_dim)
    return out


def _probe(lib) -> str | None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g)
    w = torch.randn(37, generator=g)
    tol = dict(rtol=1e-5, atol=1e-5)
    try:
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        if not torch.allclose(rms_norm(x, w, 1e-6, lib=lib), want, **tol):
            return "the compiled rms_norm is wrong on a probe"
        total, out = add_rms_norm(x, y, w, 1e-6, 1.0, lib=lib)
        want = (x + y) * torch.rsqrt((x + y).pow(2).mean(-1, keepdim=True) + 1e-6) * (w + 1)
        if not (torch.equal(total, x + y) and torch.allclose(out, want, **tol)):
            return "the compiled add_rms_norm is wrong on a probe"
        qkv = torch.randn(3, 5 * 12, generator=g)
        cos, sin = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
        want = reference_rope(qkv, cos, sin, 3, 12)
        rope(qkv, cos, sin, 3, 12, lib=lib)
        if not torch.allclose(qkv, want, **tol):
            return "the compiled rope is wrong on a probe"
        gu = torch.randn(4, 2 * 19, generator=g) * 4
        if not torch.allclose(silu_mul(gu, lib=lib), torch.nn.functional.silu(gu[:, :19]) * gu[:, 19:], **tol):
            return "the compiled silu_mul is wrong on a probe"
    except Exception as e:
        return f"the compiled ops failed on a probe: {e}"
    return None
