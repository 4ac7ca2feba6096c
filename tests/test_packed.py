"""Packed bf16 linear layers compute exactly what the plain layers compute."""

import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model
from rksc.models.packed import PackedLinear, available, pack_linears

pytestmark = pytest.mark.skipif(not available(), reason="no packed bf16 kernels on this CPU")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_packed_model_gives_bit_identical_logits(family):
    model = tiny_model(family).to(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
        swapped = pack_linears(model)
        after = model(ids).logits
    assert swapped == sum(isinstance(m, PackedLinear) for m in model.modules()) > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(before, after)


def test_float32_layers_are_left_alone():
    model = tiny_model("llama")
    assert pack_linears(model) == 0
