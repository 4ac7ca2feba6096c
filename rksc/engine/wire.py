"""What OpenAI-compatible servers send and how rksc reads it: the probe that finds what a server
gives (`Features`), streamed choices in the legacy or the Chat Completions log-prob shape turned
into `Event`s, and error bodies turned into one-line messages.

Two log-prob shapes are read:

- legacy (vLLM, rksc serve, llama-cpp-python): `token_ids` or "token_id:N" in `logprobs.tokens`,
  `token_logprobs[]`, and `top_logprobs[]` as {token: log-prob} maps;
- Chat Completions (llama-server): `logprobs.content[]`, per token its `id`, `logprob` and
  `top_logprobs[]`, each alternative with its `id`.

Where a server gives no token ids, the text is re-tokenised (token boundaries may then differ from
the model's own). Nothing here keeps state; rksc.engine.remote owns the requests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import httpx

from rksc.engine.sampler import CONFIDENCE_TOP_K
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError

TOKEN_ID = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a token


@dataclass
class Features:
    """What the server gives, found by one probe request when the backend starts."""

    model: str
    token_ids: bool  # generated token ids: vLLM's and rksc serve's `return_token_ids`, or in the log-probs
    logprobs: bool  # per-token log-probabilities
    top_logprobs: int  # alternatives per token it reports at most (0: none)
    max_context: int | None  # the server's context length, when /v1/models says
    chat_logprobs: bool = False  # log-probs in the Chat Completions shape, `logprobs.content[]` (llama-server),
    # whose entries carry token ids: every request then asks for at least one log-prob, to get the ids
    text_prompts: bool = False  # the server refuses token-id prompts: prompts go as their decoded text
    llama_cpp: bool = False  # llama-server: sampled branches switch off its default top-k 40 and min-p 0.05

    def describe(self) -> str:
        parts = [f"model {self.model}", "token ids" if self.token_ids else "no token ids (re-tokenised from text)",
                 f"top {self.top_logprobs} log-probs" if self.logprobs else "no log-probs"]
        if self.text_prompts:
            parts.append("text prompts")
        return ", ".join(parts)


@dataclass
class Event:
    """What the stream said about one sequence since the last event: new tokens, or its end."""

    seq: Sequence
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int | str, float]]] = field(default_factory=list)
    end: str | None = None  # finished | length | prefilled | error
    error: str | None = None
    cached: int | None = None


def parse_choice(seq: Sequence, choice: dict, tokenizer) -> Event:
    """A streamed choice in either log-prob shape."""
    lp = choice.get("logprobs") or {}
    if isinstance(lp.get("content"), list):  # the Chat Completions shape (llama-server)
        return parse_content(seq, lp["content"], choice, tokenizer)
    tokens = choice.get("token_ids")
    if tokens is None:
        spelled = lp.get("tokens") or []
        if spelled and all(t.startswith(TOKEN_ID) for t in spelled):
            tokens = [int(t[len(TOKEN_ID):]) for t in spelled]
        else:  # text only: re-tokenise (token boundaries may differ from the model's own)
            text = choice.get("text") or ""
            tokens = tokenizer.encode(text, add_special_tokens=False) if text else []
    logprobs = [x if x is not None else 0.0 for x in (lp.get("token_logprobs") or [])]
    tops = [sorted(((k, v) for k, v in (top or {}).items()), key=lambda kv: -kv[1])
            for top in (lp.get("top_logprobs") or [])]
    return Event(seq, list(tokens), logprobs, tops)


def parse_content(seq: Sequence, content: list[dict], choice: dict, tokenizer) -> Event:
    """A streamed choice whose log-probs come as `content[]`: per token its `id`, `logprob` and
    `top_logprobs[]` (each with its `id`); text re-tokenised only where the ids are missing."""
    if content and all(isinstance(c.get("id"), int) for c in content):
        tokens = [c["id"] for c in content]
    else:
        text = choice.get("text") or ""
        tokens = tokenizer.encode(text, add_special_tokens=False) if text else []
    logprobs = [c.get("logprob") or 0.0 for c in content]
    tops = [sorted(((t["id"] if isinstance(t.get("id"), int) else t.get("token", ""), t.get("logprob", -math.inf))
                    for t in c.get("top_logprobs") or []), key=lambda kv: -kv[1]) for c in content]
    return Event(seq, tokens, logprobs, tops)


def probe(client: httpx.Client, base_url: str, tokenizer, model: str | None) -> Features:
    """Which model to ask for and what the server gives (token ids, log-probs)."""
    try:
        r = client.get(base_url + "/models")
    except httpx.HTTPError as e:
        raise RkscError(error_message(e, base_url)) from None
    if r.status_code != 200:
        raise RkscError(f"{r.status_code} from {base_url}/models: {error_text(r.text)}")
    served = {m.get("id"): m for m in r.json().get("data", [])}
    if model is None:
        if len(served) != 1:
            raise RkscError(f"{base_url} serves {len(served)} models "
                            f"({', '.join(map(str, served))}); name one with --backend-model")
        model = next(iter(served))
    elif model not in served:
        raise RkscError(f"{base_url} does not serve {model} "
                        f"(it serves: {', '.join(map(str, served))})")
    meta = served[model].get("meta") or {}  # llama-server: n_ctx per slot
    max_context = served[model].get("max_model_len") or meta.get("n_ctx")
    max_context = int(max_context) if isinstance(max_context, int) else None
    prompt = tokenizer.encode("The answer is", add_special_tokens=False) or [0]
    trial, r = _try(client, base_url, model, prompt)
    text_prompts = r.status_code != 200
    if text_prompts:  # llama-cpp-python, Ollama, LM Studio: string prompts only
        refused = r
        trial, r = _try(client, base_url, model, tokenizer.decode(prompt))
        if r.status_code != 200:
            raise RkscError(f"{base_url}/completions refuses a plain prompt, as token ids "
                            f"({refused.status_code}: {error_text(refused.text)}) and as text "
                            f"({r.status_code}: {error_text(r.text)})")
    choice = (r.json().get("choices") or [{}])[0]
    lp = choice.get("logprobs") or {}
    if isinstance(lp.get("content"), list):  # the Chat Completions shape: ids inside
        first = (lp["content"] or [{}])[0]
        logprobs = isinstance(first.get("logprob"), (int, float))
        top = first.get("top_logprobs")
        token_ids = isinstance(first.get("id"), int)
        top_n = trial.get("logprobs", 0) if top else 0
        return Features(model, token_ids, logprobs, top_n, max_context, chat_logprobs=logprobs,
                        text_prompts=text_prompts, llama_cpp=served[model].get("owned_by") == "llamacpp")
    top = (lp.get("top_logprobs") or [None])[0]
    spelled = lp.get("tokens") or []
    token_ids = "token_ids" in choice or bool(spelled and spelled[0].startswith(TOKEN_ID))
    top_n = trial.get("logprobs", 0) if top else 0
    return Features(model, token_ids, bool(lp.get("token_logprobs")), top_n, max_context,
                    text_prompts=text_prompts)


def _try(client: httpx.Client, base_url: str, model: str, prompt) -> tuple[dict, httpx.Response]:
    """One greedy token of `prompt`, asking for the most the server may give and then less: the
    request that succeeded and its response, or the last refusal (a 4xx, or the 500 some servers
    answer a prompt type they do not take with)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "logprobs": CONFIDENCE_TOP_K, "return_token_ids": True, "return_tokens_as_token_ids": True}
    for attempt in ({}, {"logprobs": 5}, {"logprobs": 5, "return_token_ids": None,
                                          "return_tokens_as_token_ids": None}, {"logprobs": None}):
        trial = {k: v for k, v in {**body, **attempt}.items() if v is not None}
        r = client.post(base_url + "/completions", json=trial)
        if r.status_code == 200:
            return trial, r
        if r.status_code not in (400, 422, 500):
            raise RkscError(f"{r.status_code} from {base_url}/completions: {error_text(r.text)}")
    return trial, r


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


def retry_after(resp: httpx.Response, attempt: int) -> float:
    """Seconds to wait before retrying: the server's Retry-After (at most 30), else a backoff."""
    try:
        return min(float(resp.headers.get("retry-after", "")), 30.0)
    except ValueError:
        return 0.5 * 2 ** attempt


def error_text(text: str) -> str:
    """The message of an OpenAI error body, or the start of any other body."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300] or "(empty body)"


def error_message(e: Exception, url: str) -> str:
    """One line for a request to `url` that failed with `e`."""
    if isinstance(e, RkscError):
        return str(e)
    if isinstance(e, httpx.ConnectError):
        return f"cannot reach {url}: {e}"
    if isinstance(e, httpx.TimeoutException):
        return f"{url} timed out ({type(e).__name__})"
    return f"request to {url} failed: {type(e).__name__}: {e}"
