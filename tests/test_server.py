"""`rksc serve` against the real `openai` client: a live uvicorn server on 127.0.0.1 (a free port),
SmolLM2-135M in float32, completions, chat, n choices, streams, usage, log-probs, stop strings,
/v1/solve, every error status, cancels that return KV blocks, and greedy output equal to plain
`model.generate` token for token."""

import ctypes
import gc
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import faulty, metrics, plain_generate, running, wait_idle
from rksc import SolveConfig, Solver
from rksc.errors import RkscError
from rksc.reasoning.solver import eos_ids
from rksc.server.config import ServerConfig
from rksc.server.text import ChoiceText

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(smollm2):
    with running(ServerConfig(model=MODEL, kv_budget=128 << 20), lambda: smollm2) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_models_and_a_completion_with_usage(server, client, smollm2):
    url, _ = server
    assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "The three primary colours are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1 and r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(smollm2.tokenizer(prompt)["input_ids"])
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    wait_idle(url)


def test_float32_greedy_output_equals_plain_generate_token_for_token(server, client, smollm2):
    eos = eos_ids(smollm2)
    ids = smollm2.tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    expected = plain_generate(smollm2.model, ids, 24, eos)
    # n=3 greedy: every choice forks the once-prefilled prompt and must still equal generate
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, n=3,
                                  extra_body={"return_token_ids": True})
    assert r.model_extra["prompt_token_ids"] == ids
    for choice in r.choices:  # token ids include an end token, as vLLM's do; the text leaves it out
        assert choice.model_extra["token_ids"] == expected
        assert choice.text == smollm2.tokenizer.decode([t for t in expected if t not in eos], skip_special_tokens=True)
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    chat_ids = smollm2.tokenizer(smollm2.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    expected = plain_generate(smollm2.model, chat_ids, 32, eos)
    assert expected[-1] in eos  # the reply ends within 32 tokens, so the end token is checked too
    c = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert c.model_extra["prompt_token_ids"] == chat_ids and c.choices[0].model_extra["token_ids"] == expected
    assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason == "stop"
    assert c.choices[0].message.content == smollm2.tokenizer.decode(expected[:-1], skip_special_tokens=True)


def test_n_choices_prefill_the_prompt_once_and_a_repeat_reuses_its_blocks(server, client):
    url, state = server
    wait_idle(url)
    prompt = ("Quartz lanterns hum beside the violet orchard while seven herons debate the tides; "
              "meanwhile the archivist counts copper keys")
    before = state.loop.engine.pool.stats.queried_tokens
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, n=4, temperature=1.0, seed=7)
    r = client.completions.create(**kw)
    n_prompt = r.usage.prompt_tokens
    # the held prefix (all but the last prompt token) is the only lookup: the 4 choices fork it
    assert state.loop.engine.pool.stats.queried_tokens - before == n_prompt - 1
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert 4 <= r.usage.completion_tokens <= 32
    assert len({c.text for c in r.choices}) > 1  # sampled choices differ
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # same seed, same choices
    # the prefix of n_prompt - 1 tokens finds its full blocks, but always computes its last token
    assert again.usage.prompt_tokens_details.cached_tokens == (n_prompt - 2) // 16 * 16 > 0
    wait_idle(url)


def test_streams_send_chunks_then_done_and_usage_when_asked(server, client):
    url, _ = server
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    with httpx.stream("POST", url + "/v1/completions", json={**kw, "stream": True}, timeout=60) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    messages = [{"role": "user", "content": "Count from one to five."}]
    chat = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, n=2,
                                               stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    texts = ["".join(c.choices[0].delta.content or "" for c in chat if c.choices and c.choices[0].index == i)
             for i in range(2)]
    assert texts[0] == texts[1] != ""  # greedy: both choices alike
    assert 2 <= chat[-1].usage.completion_tokens <= 16


def test_logprobs_top_alternatives_and_the_chosen_token(server, client):
    r = client.completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5) and top[token] == pytest.approx(chosen)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    # vLLM's return_tokens_as_token_ids: tokens and alternatives spelled "token_id:N" (what --backend reads)
    ids = client.completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    lp_ids = ids.choices[0].logprobs
    assert lp_ids.tokens == [f"token_id:{t}" for t in ids.choices[0].model_extra["token_ids"]]
    assert lp_ids.token_logprobs == pytest.approx(lp.token_logprobs)
    assert all(len(top) == 3 and all(k.startswith("token_id:") for k in top) for top in lp_ids.top_logprobs)


def test_stop_strings_end_and_trim_the_text(server, client):
    url, _ = server
    kw = dict(model=MODEL, prompt="List: apples, pears, plums, cherries, grapes, melons,", temperature=0)
    full = client.completions.create(**kw, max_tokens=20).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2
    cut = client.completions.create(**kw, max_tokens=20, stop=[stop, "\u2603never"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, max_tokens=20, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    wait_idle(url)


def test_incremental_text_never_breaks_a_multibyte_character(smollm2):
    tok = smollm2.tokenizer
    text = "Tea 🍵 costs 5€ in 東京; naïve café ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several tokens
    stream = ChoiceText(tok, tok("Say:")["input_ids"])
    deltas = [stream.add([t]) for t in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) and not any("\ufffd" in d for d in deltas)
    held = ChoiceText(tok, [], stops=["costs 5"])
    out = "".join(held.add([t]) for t in ids) + held.finish()
    assert out == "Tea 🍵 " and held.stopped


def test_solve_answers_with_every_branch_and_streams_branches_then_the_decision(server):
    url, _ = server
    body = {"model": MODEL, "problem": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "branches": 2, "max_tokens": 24}
    r = httpx.post(url + "/v1/solve", json=body, timeout=120)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["object"] == "solve" and 0 <= s["chosen"] < 2 and len(s["branches"]) == 2
    assert s["answer"] == s["branches"][s["chosen"]]["answer"]
    for b in s["branches"]:
        assert {"text", "answer", "confidence", "verifier", "stop_reason", "tokens"} <= set(b)
        assert b["stop_reason"] in ("finished", "length") and b["verifier"] is not None
    assert s["usage"]["completion_tokens"] == sum(b["tokens"] for b in s["branches"])
    with httpx.stream("POST", url + "/v1/solve", json={**body, "stream": True}, timeout=120) as raw:
        events = [line[6:] for line in raw.iter_lines() if line]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    decision = chunks[-1]
    assert decision["object"] == "solve.decision" and decision["answer"] == s["answer"]  # greedy: same solve
    branch_chunks = [c for c in chunks[:-1] if c["object"] == "solve.chunk"]
    for i in range(2):
        mine = [c for c in branch_chunks if c["branch"] == i]
        assert mine[-1]["finish_reason"] in ("stop", "length")
        assert "".join(c["text"] for c in mine) == s["branches"][i]["text"]
    wait_idle(url)


def test_solve_with_exact_early_exit_gives_the_full_runs_answer_and_reports_it(server):
    url, _ = server
    body = {"model": MODEL, "problem": "Sam has 5 pens and gives away 2. How many pens are left?",
            "branches": 4, "max_tokens": 32, "select": "vote"}
    full = httpx.post(url + "/v1/solve", json=body, timeout=120).json()
    early = httpx.post(url + "/v1/solve", json={**body, "early_stop": "exact"}, timeout=120)
    assert early.status_code == 200, early.text
    early = early.json()
    assert full["early"] is None and early["early"] is not None and "exact" in early["early"]["policies"]
    assert early["answer"] == full["answer"]  # lossless by construction (float32, greedy)
    r = httpx.post(url + "/v1/solve", json={**body, "early_stop": ["nope"]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "early_stop"
    r = httpx.post(url + "/v1/solve", json={**body, "early_stop": "cgee"}, timeout=60)  # no profile for SmolLM2
    assert r.status_code == 400 and "rksc calibrate" in r.json()["error"]["message"]
    wait_idle(url)


def test_a_body_beyond_the_limit_gets_413(server):
    from rksc.server.app import MAX_BODY_BYTES

    url, _ = server
    r = httpx.post(url + "/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)

    r = httpx.post(url + "/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413


def test_bad_requests_get_openai_errors_naming_the_field(server, client):
    url, _ = server
    cases = [({"temperature": 5}, "temperature"), ({"n": 0}, "n"), ({"max_tokens": "many"}, "max_tokens"),
             ({"logprobs": 99}, "logprobs"), ({"echo": True}, "echo"), ({"stop": [""]}, "stop"),
             ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 10 ** 9]}, "prompt"),
             ({"stream_options": {"include_usage": True}}, "stream_options")]
    for extra, param in cases:
        body = {"model": MODEL, "prompt": "hi", **extra}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
        assert err["message"].startswith(param) or param in err["message"]
        assert "\n" not in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", top_p=0)
    assert e.value.body["param"] == "top_p" and "top_p must be in (0" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:  # beyond SmolLM2's context of 8,192 tokens
        client.completions.create(model=MODEL, prompt=[42] * 8190, max_tokens=16)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/solve", json={"model": MODEL, "problem": "1+1?", "branches": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "branches"
    assert r.json()["error"]["message"].startswith("branches must be at least 1")
    r = httpx.get(url + "/v1/nothing", timeout=60)
    assert r.status_code == 404 and "error" in r.json()
    m = metrics(url)
    assert m['rksc_requests_total{path="/v1/completions",status="400"}'] >= len(cases)
    wait_idle(url)


def test_closing_a_stream_or_dropping_a_request_frees_its_blocks_at_once(server, client):
    url, state = server
    wait_idle(url)
    counting = "1, 2, 3, 4, 5, 6,"  # greedy goes on counting: no end-of-sequence before max_tokens
    stream = client.completions.create(model=MODEL, prompt=counting, max_tokens=400, temperature=0, n=2, stream=True)
    for _, chunk in zip(range(4), stream):
        assert chunk.choices[0].finish_reason is None
    assert metrics(url)['rksc_kv_blocks{state="used"}'] > 0
    stream.close()
    idle = wait_idle(url, timeout=10)
    assert idle['rksc_sequences{state="running"}'] == 0 and idle['rksc_sequences{state="waiting"}'] == 0
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        body = {"model": MODEL, "prompt": counting, "max_tokens": 1500, "temperature": 0}
        httpx.post(url + "/v1/completions", json=body, timeout=1.5)
    wait_idle(url, timeout=10)
    solve = {"model": MODEL, "problem": "What is 12 times 12?", "branches": 3, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", url + "/v1/solve", json=solve, timeout=60) as raw:
        for line in raw.iter_lines():
            if '"solve.chunk"' in line:
                break  # a branch has tokens: leave mid-solve
    wait_idle(url, timeout=10)
    assert state.loop.engine.scheduler.held == set()


def test_503_while_loading_429_when_full_and_an_error_chunk_after_a_stream_began(smollm2):
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return smollm2

    config = ServerConfig(model=MODEL, max_queue=1, kv_budget=32 << 20)
    with running(config, slow_load, wait_loaded=False) as (url, state):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = httpx.get(url + "/health", timeout=60)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        gate.set()
        assert state.loaded.wait(60) and httpx.get(url + "/health", timeout=60).status_code == 200
        stream = c.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=300, temperature=0,
                                      stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
        state.loop.stop()  # the engine loop ends: the open stream gets an error chunk, not silence
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert "shutting down" in e.value.message
        r = httpx.get(url + "/metrics", timeout=60).text
        assert 'rksc_requests_total{path="/v1/completions",status="429"} 1' in r
        assert 'rksc_requests_total{path="/v1/completions",status="503"} 1' in r


def _rksc(*args, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "rksc.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_rksc_serve_mistakes_are_one_line_and_exit_2():
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, says in [(["--model", "no-such-model"], "unknown model"),
                           (["--model", MODEL, "--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1")]:
            proc = _rksc("serve", *args)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2 and err.count("\n") == 1 and says in err, (args, err)
            assert err.startswith("rksc: error: ")
    finally:
        busy.close()
    for bad, says in [({"port": 70000}, "port must be at most 65535"),
                      ({"max_queue": 0}, "max-queue must be at least 1"),
                      ({"block_size": 0}, "block-size must be at least 1"),
                      ({"max_solve_tokens": 0}, "max-solve-tokens must be at least 1")]:
        with pytest.raises(RkscError, match=says):
            ServerConfig(**bad)


def test_rksc_serve_listens_loads_answers_and_stops_on_ctrl_c():
    import signal

    # a suite started in the background by a shell without job control inherits SIGINT ignored;
    # a user's terminal delivers Ctrl-C, so the server gets the default handler back
    proc = _rksc("serve", "--model", MODEL, "--port", "0", "--dtype", "float32", "--kv-budget", "64M",
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_asks_on_reuses_an_earlier_requests_kv_for_a_prompt_worded_differently(smollm2):
    problem = ("A farmer has 12 cows and buys 7 more. Each cow gives 3 litres of milk a day. "
               "How many litres of milk does the farmer get each day?")
    config = ServerConfig(model=MODEL, kv_budget=64 << 20, asks="on", asks_tau=0.0)
    with running(config, lambda: smollm2) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for instruction in ("Solve this carefully.", "Think step by step and explain every part of it."):
            out = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                                 messages=[{"role": "user", "content": f"{instruction}\n\n{problem}"}])
            assert out.choices[0].finish_reason in ("length", "stop")
        m = wait_idle(url)
        assert m['rksc_asks_prefills_total{outcome="tried"}'] == 1  # the first prompt is the donor
        assert m['rksc_asks_prefills_total{outcome="reused"}'] == 1
        assert m['rksc_asks_tokens_total{kind="computed"}'] < m['rksc_asks_tokens_total{kind="prompt"}']


def test_with_an_api_key_every_endpoint_but_health_answers_401_without_it(smollm2):
    key = "sk-rksc-test-7"
    with running(ServerConfig(model=MODEL, kv_budget=32 << 20, api_key=key), lambda: smollm2) as (url, state):
        assert httpx.get(url + "/health").status_code == 200
        calls = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
                 ("POST", "/v1/completions", {"model": MODEL, "prompt": "2+2=", "max_tokens": 2}),
                 ("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]}),
                 ("POST", "/v1/solve", {"model": MODEL, "question": "What is 2+2?", "branches": 1,
                                        "max_tokens": 4}),
                 ("GET", "/v1/nowhere", None)]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            for method, path, body in calls:
                r = httpx.request(method, url + path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                error = r.json()["error"]
                assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
        for wrong in ("wrong", key + "x"):
            client = openai.OpenAI(base_url=url + "/v1", api_key=wrong, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError) as e:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
            assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == [state.lm.name]
        reply = client.completions.create(model=MODEL, prompt="2+2=", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # --backend (and the Ray workers, which open their solver with the same arguments) pass the key on
        solver = Solver.connect(url + "/v1", MODEL, api_key=key)
        assert solver.solve("What is 2+2?", SolveConfig(branches=2, max_new_tokens=8)).branches
        solver.close()
        with pytest.raises(RkscError, match="401|API key"):
            Solver.connect(url + "/v1", MODEL)


@pytest.mark.parametrize("key", ["", "two words", "kl\u00fcssel", "tab\there"])
def test_a_bad_api_key_is_refused_at_start(key):
    with pytest.raises(RkscError, match="api-key"):
        ServerConfig(model=MODEL, api_key=key)


def test_a_solve_whose_program_raises_fails_alone_and_the_others_finish(smollm2, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    real = Solver.program
    monkeypatch.setattr(Solver, "program", lambda self, p, c: faulty(real(self, p, c), 2, ValueError("injected"))
                        if "FAULT" in p["question"] else real(self, p, c))
    body = {"model": MODEL, "branches": 3, "max_tokens": 16, "temperature": 0}
    questions = ["What is 17 plus 25?", "FAULT: what is 2 plus 2?", "Tom has 3 apples and buys 4 more. How many?"]
    with running(ServerConfig(model=MODEL, kv_budget=64 << 20), lambda: smollm2) as (url, state):
        alone = [httpx.post(url + "/v1/solve", json={**body, "problem": q}, timeout=120) for q in questions[::2]]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def chat():
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=12, temperature=0)

        def streamed_fault():
            with httpx.stream("POST", url + "/v1/solve", json={**body, "problem": questions[1], "stream": True},
                              timeout=120) as r:
                return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

        with ThreadPoolExecutor(6) as pool:
            solves = [pool.submit(httpx.post, url + "/v1/solve", json={**body, "problem": q}, timeout=120)
                      for q in questions]
            chats, stream = pool.submit(chat), pool.submit(streamed_fault)
            replies = [f.result() for f in solves]
            assert chats.result().choices[0].message.content and chats.result().usage.completion_tokens > 0
            chunks = stream.result()
        assert replies[1].status_code == 500
        error = replies[1].json()["error"]
        assert "ValueError: injected" in error["message"] and error["type"] == "server_error"
        assert "error" in chunks[-1] and "injected" in chunks[-1]["error"]["message"]  # the stream ends with it
        for got, want in zip(replies[::2], alone):
            assert got.status_code == 200 and want.status_code == 200
            assert [b["text"] for b in got.json()["branches"]] == [b["text"] for b in want.json()["branches"]]
        wait_idle(url)
        engine = state.loop.engine
        assert not engine.has_work and engine.pool.num_used == 0
        engine.check()


def test_the_pool_is_committed_at_start_and_metrics_report_resident_memory(smollm2):
    from rksc.validate import resident_memory

    gc.collect()  # earlier tests' servers and pools go now, not while this one is measured
    try:  # ... and the heap memory they freed goes back to the system: a pool whose pages came from it
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # would be resident already and not grow the count
    except (OSError, AttributeError):  # not glibc
        pass
    before = resident_memory()
    with running(ServerConfig(model=MODEL, kv_budget=1 << 30), lambda: smollm2) as (url, state):
        kv = state.solver.engine.runner.kv
        pool_bytes = sum(t.nbytes for t in (*kv.k, *kv.v))
        assert pool_bytes > 0.99 * (1 << 30)
        assert metrics(url)["rksc_resident_memory_bytes"] - before > 0.9 * pool_bytes  # before any request


def test_committing_a_pool_makes_its_pages_resident():
    """In a process of its own: memory that this one frees meanwhile would hide the growth."""
    code = ("import torch; from rksc.engine.paged import PagedKV; from rksc.validate import resident_memory\n"
            "kv = PagedKV(4, 1024, 16, 8, 128, torch.float32)  # 4 layers x 2 x 16,384 slots x 1,024 floats\n"
            "before = resident_memory(); committed = kv.commit(); print(committed, resident_memory() - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    committed, grown = map(int, out.stdout.split())
    assert committed == 512 << 20 and grown > 0.9 * committed


def test_a_kv_budget_beyond_the_available_memory_fails_at_start_in_one_line(smollm2):
    from rksc.validate import available_memory

    too_big = available_memory() + (1 << 30)
    with running(ServerConfig(model=MODEL, kv_budget=min(too_big, 20 << 40)), lambda: smollm2,
                 wait_loaded=False) as (url, state):
        assert state.loaded.wait(60)
        assert state.error and "kv-budget" in state.error and "\n" not in state.error
        assert httpx.get(url + "/health").status_code == 503
