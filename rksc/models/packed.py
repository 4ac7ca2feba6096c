"""Linear layers with their weights packed once for the CPU's bf16 matrix kernels.

`F.linear` on a bf16 weight lets oneDNN reorder the weight into its blocked layout on every call,
so each decode step reads every weight twice and writes it once; a step then streams the weights
at about half this machine's memory bandwidth. Reordering once at load time and calling the
packed kernel gives the same products bit for bit (checked on a probe layer before any layer is
swapped, and pinned by a test) at close to the full bandwidth.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, rows_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def available() -> bool:
    """Whether packed bf16 products run here and equal `F.linear` exactly on a probe layer."""
    try:
        probe = nn.Linear(64, 48, dtype=torch.bfloat16)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            return torch.equal(PackedLinear(probe)(x), probe(x))
    except (RuntimeError, AttributeError):
        return False


def pack_linears(model: nn.Module) -> int:
    """Swap every bf16 nn.Linear of `model` for a PackedLinear; returns how many were swapped (0 when
    the kernels are not available). A weight tied to the input embedding is packed as a copy."""
    if not available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
