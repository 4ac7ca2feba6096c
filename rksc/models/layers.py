"""Decoder layers of the Llama and Qwen2 families as rksc runs them in float32 on its fp16 or int8 kernel.

`install(model)` fuses each layer's q, k, v products into one and its gate and up products into one
(each output column is computed alone, so fusing changes no value), and replaces the layer's forward
with `forward` below: the model's own layer, with its small operations (the two norms, the rotary
embedding, SiLU times up, the residual adds) done by one compiled call each (rksc.kernels.ops)
instead of some forty torch operations and module calls. The engine and `generate` then run the same
layers; the attention itself is still the one the model is configured with (the engine's paged
attention, or sdpa for `generate`). Other families (Gemma 3) keep their own layers.
"""

from __future__ import annotations

import sys
import types

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rksc.kernels import ops
from rksc.models.weights import Fp16Linear

FAMILIES = ("llama", "qwen2")


def supported(model) -> bool:
    cfg = model.config.get_text_config()
    return (cfg.model_type in FAMILIES and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "partial_rotary_factor", 1.0) == 1.0 and not getattr(cfg, "mlp_bias", False))


def install(model) -> int:
    """Lean forwards for every decoder layer of `model`; returns how many layers got one (0 when the
    family, the dtype or the kernels do not allow it)."""
    if not supported(model) or not ops.available():
        return 0
    layers = model.get_decoder().layers
    ready = all(isinstance(m, Fp16Linear) and m.kernel == "rksc" for layer in layers
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                          layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    if not ready or next(model.parameters()).dtype != torch.float32:
        return 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.rksc_qkv = type(attn.q_proj).fused([attn.q_proj, attn.k_proj, attn.v_proj])
        layer.rksc_gate_up = type(mlp.gate_proj).fused([mlp.gate_proj, mlp.up_proj])
        for name in ("q_proj", "k_proj", "v_proj"):
            delattr(attn, name)
        for name in ("gate_proj", "up_proj"):
            delattr(mlp, name)
        layer.forward = types.MethodType(forward, layer)
    return len(layers)


def forward(layer, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
            use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    # hidden_states: [B, T, H]; the rows of all B x T tokens go through each product together
    attn = layer.self_attn
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    h = ops.rms_norm(x, norm1.weight, norm1.variance_epsilon)
    qkv = layer.rksc_qkv(h)  # [R, (Hq + 2 Hkv) D]
    d = attn.head_dim
    q_heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    cos, sin = position_embeddings  # [B, T, D]
    ops.rope(qkv, cos.reshape(-1, d), sin.reshape(-1, d), q_heads + kv_heads, d)
    b, t = shape[0], shape[1]
    q = qkv[:, :q_heads * d].view(b, t, q_heads, d).transpose(1, 2)
    k = qkv[:, q_heads * d:(q_heads + kv_heads) * d].view(b, t, kv_heads, d).transpose(1, 2)
    v = qkv[:, (q_heads + kv_heads) * d:].view(b, t, kv_heads, d).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    window = getattr(attn, "sliding_window", None)
    extra = {"sliding_window": window} if window is not None else {}
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **extra, **kwargs)
    o = attn.o_proj(out.reshape(b * t, -1))
    x, h = ops.add_rms_norm(x, o, norm2.weight, norm2.variance_epsilon)
    m = layer.mlp.down_proj(ops.silu_mul(layer.rksc_gate_up(h)))
    return (x + m).view(shape)

