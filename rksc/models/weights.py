"""Weight formats: how a loaded model's linear layers hold their weights, and which kernel multiplies.

| format | bytes/weight | products | exact against the prepared (bf16) weights | runs fast on |
|---|---|---|---|---|
| fp32 | 4 | `F.linear` (MKL), fp32 | yes: the reference | every CPU |
| bf16 | 2 | oneDNN, weights packed once at load | yes | bf16 matrix units (AMX, AVX-512-BF16) |
| fp16 | 2 | rksc's kernel (rksc.kernels.gemm): fp32 FMA, one chain per output, batch-invariant; fbgemm's where no compiler | yes: fp16 times a power of two per row where needed, checked at load | AVX2 + FMA + F16C |
| int8 | 1.125 | rksc's kernel: fp32 FMA chains over int8 weights widened exactly, each run of 32 times its step | no: each run of 32 weights of a row (llama.cpp's Q8_0 blocks) rounded to the nearest multiple of its step, its largest magnitude / 127 | AVX2 + FMA (rksc's compiled kernel only) |

`convert(model, fmt, kernel)` swaps every `nn.Linear` for the format's module; `dense_weight` gives
any of them back as a plain [N, K] matrix (the logit lens reads rows of the unembedding).
"""

from __future__ import annotations

import torch
from torch import nn

from rksc.kernels import gemm

FORMATS = ("fp32", "bf16", "fp16", "int8")
FP16_KERNELS = ("rksc", "fbgemm")


def fused_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    """The biases of `layers` side by side (zeros for a layer without one; None when none has one)."""
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(layer.out_features) if b is None else b for layer, b in zip(layers, biases)])


class PackedBf16Linear(nn.Module):
    """A bf16 linear whose weight oneDNN reorders once, at load, instead of at every call: the same
    products bit for bit, with the weights read once per step."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        return self.weight.to_dense()


class Fp16Linear(nn.Module):
    """fp16 weights (times a power of two per row where needed: exactly the weights given), fp32 products.
    Inputs of another dtype are cast to float32 and the output back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "rksc"):
        super().__init__()
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel
        bias = None if bias is None else bias.detach().float().contiguous()
        if kernel == "rksc":
            self.panels, self.scale = gemm.pack(weight)  # [ceil(N/8), K, 8] float16, [N] or None
            self.bias = bias
        else:
            half, self.scale = gemm.fp16_rows(weight)  # fbgemm would round inexact values silently
            # with a scale, the bias is added after it (fbgemm would add it before)
            self.bias = bias if self.scale is not None else None
            self.packed = torch.ops.quantized.linear_prepack_fp16(half.float(), bias if self.scale is None else None)

    @classmethod
    def of(cls, linear: nn.Linear, kernel: str = "rksc") -> Fp16Linear:
        return cls(linear.weight, linear.bias, kernel)

    @classmethod
    def fused(cls, layers: list[Fp16Linear]) -> Fp16Linear:
        """One layer whose outputs are those of `layers` side by side (same inputs, same kernel): each
        output column is computed alone, so the values are the same as from the layers one by one."""
        return cls(torch.cat([layer.dense() for layer in layers]), fused_bias(layers), layers[0].kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        rows = x.reshape(-1, self.in_features)
        if dtype != torch.float32:
            rows = rows.float()
        if self.kernel == "rksc":
            if rows.stride(-1) != 1:
                rows = rows.contiguous()
            y = gemm.matmul(rows, self.panels, self.out_features, self.scale, self.bias)
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
            if self.scale is not None:
                y = y * self.scale
                if self.bias is not None:
                    y = y + self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def dense(self) -> torch.Tensor:
        if self.kernel == "rksc":
            return gemm.unpack(self.panels, self.out_features, self.scale)
        w = torch.ops.quantized.linear_unpack_fp16(self.packed)[0]
        return w if self.scale is None else w * self.scale[:, None]


class Int8Linear(Fp16Linear):
    """int8 weights, one fp32 step per 32 weights of a row (lossy: see gemm.quantize), fp32 products by
    rksc's kernel. Inputs of another dtype are cast to float32 and the output back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "rksc",
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape if quantized is None else quantized[0].shape
        self.kernel = "rksc"
        self.bias = None if bias is None else bias.detach().float().contiguous()
        if quantized is None:
            self.panels, self.scale = gemm.quantize(weight)
        else:
            rows, steps = quantized
            self.panels, self.scale = gemm.panel(rows), gemm.panel(steps)

    @classmethod
    def fused(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer whose outputs are those of `layers` side by side, with the same int8 values and steps
        (not quantized again), so the values are the same as from the layers one by one."""
        rows = torch.cat([gemm.unpanel(layer.panels, layer.out_features) for layer in layers])
        steps = torch.cat([gemm.unpanel(layer.scale, layer.out_features) for layer in layers])
        return cls(None, fused_bias(layers), quantized=(rows, steps))


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """Every linear layer of `model`, in any format."""
    return [m for m in model.modules() if type(m) in (nn.Linear, PackedBf16Linear, Fp16Linear, Int8Linear)]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [N, K] weight of a linear layer in any format."""
    return module.dense() if hasattr(module, "dense") else module.weight


def convert(model: nn.Module, fmt: str, kernel: str | None = None) -> int:
    """Swap every `nn.Linear` of `model` for format `fmt` (fp32: left as they are); returns how many
    were swapped. A weight tied to the input embedding is converted as a copy. Raises ValueError, with
    the model unchanged, when a weight has no exact value in an exact format (int8 rounds: it never raises)."""
    assert fmt in FORMATS, fmt
    if fmt == "fp32":
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    built = [PackedBf16Linear(child) if fmt == "bf16" else Int8Linear.of(child) if fmt == "int8"
             else Fp16Linear.of(child, kernel or "rksc") for _, _, child in swaps]  # all built before any is swapped in
    for (parent, name, _), module in zip(swaps, built):
        setattr(parent, name, module)
    return len(swaps)
