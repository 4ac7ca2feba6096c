"""Weight formats and the per-machine choice: every format's products equal a dequantize-then-matmul
reference, fp16 holds the prepared weights exactly, and `auto` picks each kind's path (the probe is
faked for the kinds this machine is not). The kernels' own properties: tests/test_kernels.py."""

import copy

import pytest
import torch

from conftest import TINY_FAMILIES, plain_generate, tiny_model
from rksc.errors import RkscError
from rksc.kernels import gemm
from rksc.kernels.machine import Machine, probe
from rksc.models import weights
from rksc.models.compute import choose, formats

HERE = probe()
needs_rksc_kernel = pytest.mark.skipif(not gemm.available(), reason=f"rksc's kernel: {gemm.status().error}")
needs_bf16 = pytest.mark.skipif(not HERE.bf16_packed, reason="no packed bf16 kernels on this CPU")
needs_fbgemm = pytest.mark.skipif(not HERE.fbgemm_fp16, reason="no fbgemm fp16 kernels on this CPU")

FP16_KERNELS = [pytest.param("rksc", marks=needs_rksc_kernel), pytest.param("fbgemm", marks=needs_fbgemm)]


def bf16_weight(n, k, seed=0, scale=0.05):
    """Weights as the prepared models hold them: bf16 values."""
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16().float()


def reference(x, w, bias=None):
    """The product computed in float64 from the dense weight, rounded once."""
    y = x.double() @ w.double().T
    return (y if bias is None else y + bias.double()).float()


# tolerance of an fp32 product over K terms against the float64 reference: a few ulps per term
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", FP16_KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_products_equal_a_dequantize_then_matmul_reference(kernel, bias):
    lin = torch.nn.Linear(300, 77, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(bf16_weight(77, 300))
        lin.weight[5, 7] = 2.0 ** -30  # a row that needs a power-of-two scale to stay exact
    layer = weights.Fp16Linear.of(lin, kernel)
    assert torch.equal(layer.dense(), lin.weight)  # the weights are held exactly
    x = torch.randn(13, 300)
    assert torch.allclose(layer(x), reference(x, lin.weight, lin.bias), **TOL)
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # other dtypes are cast around the product


@needs_rksc_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_int8_products_equal_a_dequantize_then_matmul_reference_and_weights_move_half_a_step_at_most(bias):
    lin = torch.nn.Linear(300, 77, bias=bias)  # 300 = 9 runs of 32 and one of 12
    with torch.no_grad():
        lin.weight.copy_(bf16_weight(77, 300))
        lin.weight[9] = 0.0  # a row of zeros: steps of 1, products of 0 (+ bias)
    layer = weights.Int8Linear.of(lin)
    w = layer.dense()
    steps = gemm.unpanel(layer.scale, 77)  # [77, 10]: one step per run of 32 weights
    levels = gemm.unpanel(layer.panels, 77)
    assert steps.shape == (77, 10) and torch.all(steps[9] == 1.0) and torch.all(w[9] == 0)
    per_weight = steps.repeat_interleave(gemm.GROUP, dim=1)[:, :300]
    assert levels.dtype == torch.int8 and torch.equal(w, levels.float() * per_weight)  # a level times its step
    assert torch.all((w - lin.weight).abs() <= per_weight * (0.5 + 1e-5))  # the nearest level: half a step at most
    runs = torch.nn.functional.pad(lin.weight.detach().abs(), (0, 20)).view(77, 10, 32).amax(dim=2)
    assert torch.allclose(steps[:9] * 127, runs[:9], rtol=1e-6)  # each run's largest magnitude is a level
    x = torch.randn(13, 300)
    y = layer(x)
    assert torch.allclose(y, reference(x, w, lin.bias), **TOL)  # the product is exact on the held weights
    assert not torch.allclose(y, reference(x, lin.weight, lin.bias), **TOL)  # ... which are not the given ones
    assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(13)]), y)  # rows do not depend on their batch
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@needs_rksc_kernel
def test_fused_int8_layers_keep_each_layers_levels_and_steps():
    layers = [weights.Int8Linear(bf16_weight(n, 40, seed=n), torch.randn(n)) for n in (24, 8, 13)]
    fused = weights.Int8Linear.fused(layers)
    x = torch.randn(5, 40)
    assert torch.equal(fused.dense(), torch.cat([layer.dense() for layer in layers]))
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=1))


@needs_rksc_kernel
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_int8_model_equals_the_float32_model_on_the_dequantized_weights(family):
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    plain = copy.deepcopy(model)
    ids = torch.randint(3, 96, (1, 29), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
        swapped = weights.convert(model, "int8")
        after = model(ids).logits
        held = dict(model.named_modules())
        for name, module in plain.named_modules():  # the plain model on the weights int8 holds
            if type(module) is torch.nn.Linear:  # a new Parameter: a tied lm_head is untied, as convert does
                module.weight = torch.nn.Parameter(held[name].dense().clone(), requires_grad=False)
        dequantized = plain(ids).logits
    assert swapped == sum(isinstance(m, weights.Int8Linear) for m in model.modules()) > 0
    assert torch.allclose(after, dequantized, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, rtol=1e-4, atol=1e-4)  # lossy: fidelity.py measures how much


@needs_bf16
def test_packed_bf16_products_equal_plain_bf16_products_bit_for_bit():
    lin = torch.nn.Linear(64, 48).bfloat16()
    x = torch.randn(5, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(weights.PackedBf16Linear(lin)(x), lin(x))
        assert torch.equal(weights.dense_weight(weights.PackedBf16Linear(lin)), lin.weight)


def test_a_row_fp16_cannot_hold_even_scaled_is_refused_and_the_model_is_left_as_it_was():
    w = bf16_weight(4, 16)
    w[1, 0], w[1, 1] = 1.0, 2.0 ** -60  # 60 binades apart: no power of two brings both into fp16
    with pytest.raises(ValueError, match="no exact float16 value"):
        gemm.pack(w)
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3, 2], model.lm_head.weight[3, 3] = 1.0, 2.0 ** -60
    with pytest.raises(ValueError):
        weights.convert(model, "fp16", "rksc" if gemm.available() else "fbgemm")
    assert all(type(m) is not weights.Fp16Linear for m in model.modules())


@pytest.mark.parametrize("kernel", FP16_KERNELS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fp16_model_matches_the_float32_model_and_keeps_tied_weights_apart(kernel, family):
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # prepared weights are bf16 values
    ids = torch.randint(3, 96, (1, 29), generator=torch.Generator().manual_seed(1))
    embed_before = model.get_input_embeddings().weight.clone()
    with torch.inference_mode():
        before = model(ids).logits
        swapped = weights.convert(model, "fp16", kernel)
        after = model(ids).logits
    assert swapped == sum(isinstance(m, weights.Fp16Linear) for m in model.modules()) > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


# ---- the choice, for every kind of machine ----

def machine(kind: str, rksc: bool = True, fbgemm: bool = True) -> Machine:
    flags = {"amx": {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"},
             "avx512-bf16": {"avx2", "fma", "f16c", "avx512f", "avx512_bf16"},
             "avx2": {"avx2", "fma", "f16c"}, "baseline": set()}[kind]
    units = kind in ("amx", "avx512-bf16")
    avx2 = kind != "baseline"
    return Machine("fake CPU", 2, 2, "AVX512" if units else "AVX2" if avx2 else "DEFAULT", frozenset(flags),
                   bf16_packed=units, rksc_fp16=None if rksc and avx2 else "no compiler",
                   fbgemm_fp16=fbgemm and avx2)


@pytest.mark.parametrize("kind, dtype, fmt, kernel", [
    ("amx", "bfloat16", "bf16", "onednn"),
    ("avx512-bf16", "bfloat16", "bf16", "onednn"),
    ("avx2", "float32", "fp16", "rksc"),
    ("baseline", "float32", "fp32", "mkl"),
])
def test_auto_picks_each_kinds_fastest_exact_path(kind, dtype, fmt, kernel):
    m = machine(kind)
    assert m.kind == kind
    c = choose(m)
    assert (c.dtype, c.weights, c.kernel) == (dtype, fmt, kernel)
    assert c.reasons and c.auto


def test_auto_says_when_it_falls_back_from_rksc_kernel_to_fbgemm():
    c = choose(machine("avx2", rksc=False))
    assert (c.weights, c.kernel) == ("fp16", "fbgemm")
    assert "no compiler" in c.reasons[-1]
    assert choose(machine("avx2", rksc=False, fbgemm=False)).weights == "fp32"


@pytest.mark.parametrize("kind, dtype, fmt, message", [
    ("avx2", "auto", "bf16", "needs bf16 matrix instructions"),
    ("baseline", "auto", "fp16", "needs AVX2, FMA and F16C"),
    ("amx", "float32", "bf16", "computes in bfloat16"),
    ("amx", "bfloat16", "fp32", "computes in float32"),
    ("baseline", "bfloat16", "auto", "needs bf16 matrix units or an fp16 kernel"),
    ("avx2", "int4", "auto", "unknown dtype"),
    ("baseline", "auto", "int8", "needs rksc's compiled kernel"),
    ("avx2", "auto", "int3", "unknown weight format"),
])
def test_a_path_the_machine_cannot_run_is_one_clear_error(kind, dtype, fmt, message):
    with pytest.raises(RkscError, match=message):
        choose(machine(kind), dtype, fmt)


def test_explicit_choices_that_run():
    assert choose(machine("amx"), "auto", "fp16").dtype == "float32"  # fp16 weights compute in float32
    c = choose(machine("avx2"), "bfloat16", "auto")  # bf16 activations on AVX2: fp16 products, cast around
    assert (c.dtype, c.weights) == ("bfloat16", "fp16") and "cast" in c.reasons[-1]
    assert choose(machine("avx2"), "float32", "fp32").kernel == "mkl"
    for kind in ("amx", "avx512-bf16", "avx2"):  # int8 is never auto's choice, runs where rksc's kernel runs
        c = choose(machine(kind), "auto", "int8")
        assert (c.dtype, c.weights, c.kernel) == ("float32", "int8", "rksc-int8") and "lossy" in c.reasons[-1]
        assert choose(machine(kind)).weights != "int8"
    with pytest.raises(RkscError, match="needs rksc's compiled kernel"):
        choose(machine("avx2", rksc=False), "auto", "int8")  # fbgemm has no int8 path here: no silent fallback


def test_formats_list_every_format_with_why_not():
    rows = {f["weights"]: f for f in formats(machine("avx2"))}
    assert rows["fp16"]["runs"] and rows["fp32"]["runs"] and not rows["bf16"]["runs"]
    assert "bf16 matrix instructions" in rows["bf16"]["note"]
    assert rows["int8"]["runs"] and rows["int8"]["bytes"] == 1.125 and not rows["int8"]["exact"]
    assert all(rows[f]["exact"] for f in ("fp32", "bf16", "fp16"))


def test_this_machine_is_one_of_the_kinds_and_its_probe_agrees_with_its_kernels():
    assert HERE.kind in ("amx", "avx512-bf16", "avx2", "baseline")
    assert (HERE.rksc_fp16 is None) == gemm.available()
    assert HERE.bf16_packed == (HERE.kind in ("amx", "avx512-bf16"))


@needs_rksc_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lean_layers_compute_the_models_own_layers_and_the_engine_still_equals_generate(family):
    from rksc.engine.engine import Engine
    from rksc.engine.sequence import Sequence
    from rksc.kernels import ops
    from rksc.models import layers

    if not ops.available():
        pytest.skip(f"rksc's ops: {ops.status().error}")
    model = tiny_model(family, layers=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        if family == "qwen2":  # its q, k, v biases are zeros at initialisation: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape).bfloat16().float())
    ids = torch.randint(3, 96, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(ids).logits
        weights.convert(model, "fp16", "rksc")
        assert layers.install(model) == 3
        after = model(ids).logits
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")  # fused into one product
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    engine = Engine(model, kv_budget=1 << 24, block_size=4)
    prefix = engine.add(Sequence(ids[0].tolist(), hold=True))
    while not prefix.finished:
        engine.step()
    seqs = [engine.add(Sequence(prefix.ids + [5 + i], 16, parent=prefix)) for i in range(3)]
    engine.release(prefix)
    while engine.has_work:
        engine.step()
    for s in seqs:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 16, set())


def test_lean_layers_are_only_installed_where_they_compute_the_same():
    from rksc.models import layers

    assert layers.install(tiny_model("llama")) == 0  # float32 weights: the model's own layers
    gemma = tiny_model("gemma3")
    with torch.no_grad():
        for p in gemma.parameters():
            p.copy_(p.bfloat16().float())
    weights.convert(gemma, "fp16", "rksc" if gemm.available() else "fbgemm")
    assert layers.install(gemma) == 0  # another family
