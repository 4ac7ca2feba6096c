"""Requests generated from the server's own OpenAPI document (schemathesis), valid and invalid,
against a live `rksc serve` on 127.0.0.1: no 5xx, every 4xx an OpenAI error body, every answer as
documented, and the server healthy and idle afterwards. Then hostile requests written by hand.

The server runs a randomly initialised two-layer model with SmolLM2's tokenizer, so that a
few hundred requests, many of which decode, take under a minute: what is fuzzed is the API, not the model."""

import json
import os
import socket
import time
from collections import Counter

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from conftest import running, wait_idle
from rksc.models.loader import LoadedModel
from rksc.server import app as server_app
from rksc.server.config import ServerConfig

pytestmark = pytest.mark.slow
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUESTS = int(os.environ.get("RKSC_FUZZ_REQUESTS", 600))  # generated requests, valid and invalid, every endpoint


@pytest.fixture(scope="module")
def tiny(smollm2):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LoadedModel("tiny", smollm2.path, tf.LlamaForCausalLM(config).eval(), smollm2.tokenizer, "float32")


@pytest.fixture(scope="module")
def server(tiny):
    # a context of 256 tokens, and 1 MiB of KV (2,048 tokens): no request decodes for long
    config = ServerConfig(kv_budget=1 << 20, api_key=KEY, max_solve_tokens=1024, max_queue=8)
    with running(config, lambda: tiny) as (url, state):
        yield url, state


def openai_error_body(ctx, response, case):
    """A 4xx answers with OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.text)
        error = body["error"]
        assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body


def bounded(case):
    """A valid request that leaves out its length asks for the whole context (chat; a solve asks for
    512 tokens, more than the fuzzed model's context: a 400): give it a short one, so that valid
    requests of every kind are answered and hundreds of them take under a minute."""
    name = {"/v1/solve": "max_tokens", "/v1/chat/completions": "max_completion_tokens"}.get(case.path)
    body = case.body
    if name and isinstance(body, dict) and body.get("max_tokens") is None and body.get(name) is None:
        body[name] = 8
    return case


def idle_and_clean(url: str, state) -> None:
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    m = wait_idle(url, headers=AUTH)
    assert m["rksc_requests_in_flight"] == 0 and m['rksc_kv_blocks{state="used"}'] == 0
    engine = state.loop.engine
    assert not engine.has_work and engine.pool.num_used == 0
    engine.check()


def test_generated_requests_get_answers_or_openai_errors_and_never_a_5xx(server):
    url, state = server
    document = httpx.get(url + "/openapi.json", headers=AUTH, timeout=30).json()
    assert document["paths"]["/v1/solve"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["model"]["enum"] == ["tiny"]
    schema = schemathesis.openapi.from_dict(document)
    statuses: Counter = Counter()
    seconds: Counter = Counter()

    valid, invalid = schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)

    @settings(max_examples=REQUESTS, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=valid.map(bounded) | invalid)
    def fuzz(case):
        t = time.monotonic()
        response = case.call(base_url=url, headers=AUTH, timeout=120)
        statuses[case.method, case.path, response.status_code] += 1
        seconds[case.method, case.path, response.status_code] += time.monotonic() - t
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance,
                                                 openai_error_body])

    started = time.monotonic()
    fuzz()
    elapsed = time.monotonic() - started
    print(f"\n{sum(statuses.values())} generated requests in {elapsed:.0f} s:",
          ", ".join(f"{m} {p} {s}: {n} ({seconds[m, p, s]:.0f} s)" for (m, p, s), n in sorted(statuses.items())))
    assert sum(statuses.values()) >= REQUESTS
    assert not any(s >= 500 for _, _, s in statuses)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/solve"):  # both answers and refusals were hit
        assert any(p == path and s == 200 for _, p, s in statuses), path
        assert any(p == path and s == 400 for _, p, s in statuses), path
    idle_and_clean(url, state)


def post(url: str, path: str, body=None, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={**AUTH, **kw.pop("headers", {})}, timeout=60, **kw)


def refused(response: httpx.Response, status: int = 400, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_hostile_requests_are_refused_in_one_line_and_the_server_stays_well(server, monkeypatch):
    url, state = server
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    text = {"model": "tiny", "prompt": "hi"}
    # huge counts: choices, tokens, log-probs, stop strings, branches, tree depth
    refused(post(url, "/v1/completions", {**text, "n": 10**9}), param="n")
    assert refused(post(url, "/v1/completions", {**text, "n": 128, "max_tokens": 200}))["code"] == "kv_budget_exceeded"
    assert refused(post(url, "/v1/completions", {**text, "max_tokens": 10**18}))["code"] == "context_length_exceeded"
    refused(post(url, "/v1/completions", {**text, "logprobs": 10**6}), param="logprobs")
    refused(post(url, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 10**6}), param="top_logprobs")
    refused(post(url, "/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(5000)]}), param="stop")
    refused(post(url, "/v1/completions", {**text, "prompt": list(range(3000))}), param="prompt")
    solve = {"model": "tiny", "problem": "What is 2 + 2?"}
    assert refused(post(url, "/v1/solve", {**solve, "branches": 1024, "max_tokens": 100, "depth": 64,
                                           "keep": 1024}))["code"] == "solve_too_large"
    refused(post(url, "/v1/solve", {**solve, "depth": 10**6}), param="depth")
    assert refused(post(url, "/v1/solve", {**solve, "max_tokens": 10**12}))["code"] == "context_length_exceeded"
    # deep JSON, as a whole body and inside a field
    deep = "[" * 200_000 + "]" * 200_000
    assert "not valid JSON" in refused(post(url, "/v1/completions", content=deep,
                                            headers={"Content-Type": "application/json"}))["message"]
    nested = json.dumps(chat)[:-1] + ', "stop": ' + "[" * 5000 + "]" * 5000 + "}"
    refused(post(url, "/v1/chat/completions", content=nested, headers={"Content-Type": "application/json"}))
    # the wrong Content-Type: a JSON body is read as JSON (as curl -d sends it); anything else is a 400
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = post(url, "/v1/completions", content=json.dumps({**text, "max_tokens": 2}), headers={"Content-Type": kind})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    refused(post(url, "/v1/completions", data={"model": "tiny", "prompt": "hi"}))  # a real form
    refused(post(url, "/v1/completions", files={"prompt": ("p.txt", b"hi")}))  # a real multipart upload
    # slowloris: bodies that never finish get 408 and hold nothing; meanwhile others are answered
    monkeypatch.setattr(server_app, "BODY_TIMEOUT_S", 1.5)
    host, port = url.removeprefix("http://").split(":")
    slow = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"".encode())
        slow.append(s)
    t = time.monotonic()
    r = post(url, "/v1/completions", {**text, "max_tokens": 3})
    assert r.status_code == 200 and time.monotonic() - t < 1.5  # answered while every slow body is pending
    for s in slow:
        with s, s.makefile("rb") as answer:
            assert answer.readline().startswith(b"HTTP/1.1 408")
            headers = dict(line.decode().lower().strip().split(": ", 1) for line in iter(answer.readline, b"\r\n"))
            body = json.loads(answer.read(int(headers["content-length"])))
        assert body["error"]["code"] == "request_timeout" and "did not arrive within 1.5 s" in body["error"]["message"]
    assert time.monotonic() - t < 10
    idle_and_clean(url, state)
