"""A model behind an OpenAI-compatible server (rksc serve, vLLM, SGLang, llama.cpp's server), with
the engine's surface, so every reasoning program runs on it unchanged.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", tokenizer, eos)
    seq = backend.add(Sequence(prompt_ids, max_tokens=64))
    while not seq.finished:
        backend.step()

It implements rksc.engine.api's `EngineAPI` (as `Engine` does on the local block pool) on the
wire:

- a sequence that generates is one streamed `/v1/completions` request with its token-id prompt
  and n=1, so the server's prefix cache shares the problem prefix between branches, and one
  branch is cancelled by closing its stream;
- a prompt-only sequence that is held (a problem prefix to fork from) needs no request: the
  server caches prefixes by itself; forks send their whole prompt (no copy-free forks across
  the network);
- a verifier question (`keep_logits`) asks for one greedy token with its top log-probabilities;
  its `logits` are those log-probabilities in a vector of -inf elsewhere, which gives the same
  P(YES) / (P(YES) + P(NO)) as the full distribution when the YES and NO tokens are among the
  top ones (they are after a YES/NO question, unless the model would answer something else).

Requests run on an asyncio loop in a background thread, at most `max_inflight` at a time.
`step` waits for the next stream events and applies them to their sequences, so a program's
`Progress` waits see tokens as they arrive. A request is retried (connection refused, 429, 5xx)
only before its first token; an error after that ends the sequence with the error.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import torch

from rksc.engine.driver import Program, run_programs
from rksc.engine.api import EngineStats
from rksc.engine.sampler import CONFIDENCE_TOP_K
from rksc.engine.sequence import Sequence, Status
from rksc.errors import RkscError

RETRIES = 3  # attempts after the first, before a request's first token
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
class _Event:
    seq: Sequence
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int | str, float]]] = field(default_factory=list)
    end: str | None = None  # finished | length | prefilled | error
    error: str | None = None
    cached: int | None = None


class OpenAIBackend:
    def __init__(self, base_url: str, tokenizer, eos: Iterable[int], model: str | None = None,
                 api_key: str | None = None, max_inflight: int = 64, timeout: float = 600.0):
        """`base_url`: the server's API root (http://host:port/v1; a URL without /v1 gets it);
        `model`: the served model's id (default: the only one /v1/models lists); `tokenizer`: the
        served model's tokenizer (prompts are sent as token ids)."""
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.tokenizer, self.eos = tokenizer, frozenset(eos)
        self.vocab = len(tokenizer)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.max_inflight = max_inflight
        self.features = self._probe(model)
        self.stats = EngineStats()
        self.warnings: list[str] = []
        if self.features.text_prompts:
            self.warnings.append(f"{self.base_url} takes no token-id prompts: prompts are sent as text and "
                                 "tokenised by the server, so token boundaries, and with them exactness against "
                                 "a local run, are lost")
        if not self.features.token_ids:
            self.warnings.append(f"{self.base_url} returns no token ids: generated text is re-tokenised, "
                                 "so token counts and verifier prompts may differ slightly from a local run")
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._live: set[Sequence] = set()
        self._tasks: dict[int, asyncio.Future] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rksc-remote", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> httpx.AsyncClient:
        self._gate = asyncio.Semaphore(self.max_inflight)
        limits = httpx.Limits(max_connections=self.max_inflight, max_keepalive_connections=self.max_inflight)
        return httpx.AsyncClient(headers=self.headers, timeout=self.timeout, limits=limits)

    def close(self) -> None:
        """Cancel what is in flight and stop the loop."""
        for seq in list(self._live):
            self.cancel(seq)
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _shutdown(self) -> None:
        """Let cancelled requests close their streams, then close the client and the async generators."""
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()
        await self._loop.shutdown_asyncgens()

    # ---- the engine interface (rksc.engine.api) ----
    def add(self, seq: Sequence) -> Sequence:
        if seq.options.asks is not None:
            raise RkscError("--asks on runs on the local engine; a remote backend has its own cache")
        if seq.options.layer_exit is not None:
            raise RkscError("the verifier's layer exit (--early-stop layers) needs the local engine, "
                            "not a remote backend")
        if (seq.options.keep_logits or seq.options.confidence) and not self.features.logprobs:
            raise RkscError(f"{self.base_url} gives no log-probs, which the verifier and token confidences need; "
                            "solve with --no-verify (vote) and without confidence-based early exit")
        seq.status = Status.RUNNING
        self._live.add(seq)
        if seq.max_tokens == 0 and not seq.options.keep_logits:  # a prefix to fork: the server caches it itself
            self._events.put(_Event(seq, end="prefilled"))
        else:
            self._tasks[seq.id] = asyncio.run_coroutine_threadsafe(self._request(seq), self._loop)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End a sequence now; its stream is closed, so the server stops it and frees its KV."""
        task = self._tasks.pop(seq.id, None)
        if task is not None:
            task.cancel()
        if not seq.finished:
            self._finish(seq, "cancelled")

    def release(self, seq: Sequence) -> None:
        """Nothing is held on this side."""

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    def drop_cached(self) -> int:
        """The server's prefix cache cannot be emptied from here."""
        return 0

    def kv_bytes(self, seqs) -> None:
        """The KV is on the server, which does not say how much each request holds."""
        return None

    def block_bytes(self) -> None:
        return None

    def step(self) -> list[Sequence]:
        """Wait for the next stream events (at least one) and apply them; returns the sequences
        that gained tokens or ended."""
        if not self._live:
            return []
        events = [self._events.get()]
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        self.stats.steps += 1
        now, touched = time.perf_counter(), []
        for ev in events:
            seq = ev.seq
            if seq.finished:  # cancelled while its events were on the way
                continue
            if not seq.book.prefilled:
                seq.book.prefilled, seq.out.prefilled_at = True, now
            seq.book.last_step = self.stats.steps
            self._apply(seq, ev)
            touched.append(seq)
        return touched

    def run(self, programs: Iterable[Program], concurrency: int = 1, errors=(RkscError,)):
        return run_programs(self, programs, concurrency, errors)

    # ---- events ----
    def _apply(self, seq: Sequence, ev: _Event) -> None:
        if ev.cached is not None:
            seq.out.cached_tokens = ev.cached
        if _is_question(seq) and ev.end == "prefilled":
            seq.out.logits = self._logits(ev.tops[0] if ev.tops else [])
        else:
            room = seq.max_tokens - len(seq.token_ids)
            tokens = ev.tokens[:room]
            self.stats.sampled += len(tokens)
            seq.token_ids += tokens
            seq.out.token_probs += [math.exp(lp) for lp in ev.logprobs[:len(tokens)]]
            if seq.options.confidence:
                seq.out.token_confs += [-sum(lp for _, lp in top) / len(top) if top else 0.0
                                    for top in ev.tops[:len(tokens)]]
        if ev.end is not None:
            if ev.end == "finished" and (not seq.token_ids or seq.token_ids[-1] not in self.eos) \
                    and seq.wants_token and self.tokenizer.eos_token_id is not None:
                seq.token_ids.append(self.tokenizer.eos_token_id)  # a server that leaves the end token out
            self._finish(seq, ev.end, ev.error)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.status, seq.stop_reason, seq.out.error = Status.FINISHED, reason, error
        self._live.discard(seq)
        self._tasks.pop(seq.id, None)

    def _logits(self, top: list[tuple[int | str, float]]) -> torch.Tensor:
        logits = torch.full((self.vocab,), -math.inf)
        for token, lp in top:
            for t in self._ids_of(token):
                logits[t] = max(logits[t].item(), lp)
        return logits

    def _ids_of(self, token: int | str) -> list[int]:
        """Token ids of a top-log-prob key: an id, vLLM's "token_id:N", or a token's text."""
        if isinstance(token, int):
            return [token]
        if token.startswith(TOKEN_ID) and token[len(TOKEN_ID):].isdigit():
            return [int(token[len(TOKEN_ID):])]
        return self._text_ids().get(token, [])

    def _text_ids(self) -> dict[str, list[int]]:
        if not hasattr(self, "_by_text"):
            by: dict[str, list[int]] = {}
            for t in range(self.vocab):
                by.setdefault(self.tokenizer.decode([t]), []).append(t)
            self._by_text = by
        return self._by_text

    # ---- requests ----
    def _body(self, seq: Sequence) -> dict:
        verify = _is_question(seq)
        f = self.features
        prompt = self.tokenizer.decode(seq.prompt_ids) if f.text_prompts else seq.prompt_ids
        body = {"model": f.model, "prompt": prompt, "n": 1, "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 1 if verify else seq.max_tokens}
        s = seq.sampling
        if verify or s.temperature == 0:
            body["temperature"] = 0.0
        else:
            body.update(temperature=s.temperature, top_p=s.top_p, seed=(s.seed * 1_000_003 + seq.options.branch) % (1 << 31))
            if f.llama_cpp:  # sample from temperature and top-p alone, as the local sampler does
                body.update(top_k=0, min_p=0.0)
        if f.logprobs:
            want = CONFIDENCE_TOP_K if (verify or seq.options.confidence) else 0
            body["logprobs"] = max(min(want, f.top_logprobs), 1 if f.chat_logprobs else 0)
        if f.token_ids and not f.chat_logprobs:
            body["return_token_ids"] = True
            body["return_tokens_as_token_ids"] = True
        return body

    async def _request(self, seq: Sequence) -> None:
        try:
            async with self._gate:
                await self._stream(seq, self._body(seq))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends the sequence with its message
            self._events.put(_Event(seq, end="error", error=_message(e, self.base_url)))

    async def _stream(self, seq: Sequence, body: dict) -> None:
        verify = _is_question(seq)
        url = self.base_url + "/completions"
        for attempt in range(RETRIES + 1):
            started = False
            try:
                async with self._client.stream("POST", url, json=body) as resp:
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode("utf-8", "replace")
                        if _retryable(resp.status_code) and attempt < RETRIES:
                            await asyncio.sleep(_retry_after(resp, attempt))
                            continue
                        raise RkscError(f"{resp.status_code} from {url}: {_error_text(text)}")
                    reason, cached, tops = None, None, []
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise RkscError(f"the server failed mid-stream: {_error_text(data)}")
                        if chunk.get("usage"):
                            details = chunk["usage"].get("prompt_tokens_details") or {}
                            cached = details.get("cached_tokens")
                        for choice in chunk.get("choices") or []:
                            ev = self._parse(seq, choice)
                            started = True
                            reason = choice.get("finish_reason") or reason
                            if verify:
                                tops += ev.tops
                            elif ev.tokens:
                                self._events.put(ev)
                    if reason is None:  # a stream that ends without saying why was cut short
                        raise RkscError(f"{url} ended a stream without a finish_reason, so the completion was cut "
                                        "short (llama-cpp-python's server does this to a streaming request when "
                                        "another one arrives: start it with --interrupt_requests False)")
                    end = "prefilled" if verify else ("length" if reason == "length" else "finished")
                    self._events.put(_Event(seq, tops=tops, end=end, cached=cached))
                    return
            except (httpx.TransportError, httpx.TimeoutException):
                if started or attempt == RETRIES:
                    raise
                await asyncio.sleep(0.5 * 2 ** attempt)

    def _parse(self, seq: Sequence, choice: dict) -> _Event:
        lp = choice.get("logprobs") or {}
        if isinstance(lp.get("content"), list):  # the Chat Completions shape (llama-server)
            return _parse_content(seq, lp["content"], choice, self.tokenizer)
        tokens = choice.get("token_ids")
        if tokens is None:
            spelled = lp.get("tokens") or []
            if spelled and all(t.startswith(TOKEN_ID) for t in spelled):
                tokens = [int(t[len(TOKEN_ID):]) for t in spelled]
            else:  # text only: re-tokenise (token boundaries may differ from the model's own)
                text = choice.get("text") or ""
                tokens = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        logprobs = [x if x is not None else 0.0 for x in (lp.get("token_logprobs") or [])]
        tops = [sorted(((k, v) for k, v in (top or {}).items()), key=lambda kv: -kv[1])
                for top in (lp.get("top_logprobs") or [])]
        return _Event(seq, list(tokens), logprobs, tops)

    # ---- the probe ----
    def _probe(self, model: str | None) -> Features:
        """Which model to ask for and what the server gives (token ids, log-probs)."""
        with httpx.Client(headers=self.headers, timeout=self.timeout) as client:
            try:
                r = client.get(self.base_url + "/models")
            except httpx.HTTPError as e:
                raise RkscError(_message(e, self.base_url)) from None
            if r.status_code != 200:
                raise RkscError(f"{r.status_code} from {self.base_url}/models: {_error_text(r.text)}")
            served = {m.get("id"): m for m in r.json().get("data", [])}
            if model is None:
                if len(served) != 1:
                    raise RkscError(f"{self.base_url} serves {len(served)} models ({', '.join(map(str, served))}); "
                                    "name one with --backend-model")
                model = next(iter(served))
            elif model not in served:
                raise RkscError(f"{self.base_url} does not serve {model} (it serves: {', '.join(map(str, served))})")
            meta = served[model].get("meta") or {}  # llama-server: n_ctx per slot
            max_context = served[model].get("max_model_len") or meta.get("n_ctx")
            prompt = self.tokenizer.encode("The answer is", add_special_tokens=False) or [0]
            trial, r = self._try(client, model, prompt)
            text_prompts = r.status_code != 200
            if text_prompts:  # llama-cpp-python, Ollama, LM Studio: string prompts only
                refused = r
                trial, r = self._try(client, model, self.tokenizer.decode(prompt))
                if r.status_code != 200:
                    raise RkscError(f"{self.base_url}/completions refuses a plain prompt, as token ids "
                                    f"({refused.status_code}: {_error_text(refused.text)}) and as text "
                                    f"({r.status_code}: {_error_text(r.text)})")
            choice = (r.json().get("choices") or [{}])[0]
            lp = choice.get("logprobs") or {}
            if isinstance(lp.get("content"), list):  # the Chat Completions shape: ids inside
                first = (lp["content"] or [{}])[0]
                logprobs = isinstance(first.get("logprob"), (int, float))
                top = first.get("top_logprobs")
                token_ids = isinstance(first.get("id"), int)
                return Features(model, token_ids, logprobs, trial.get("logprobs", 0) if top else 0,
                                int(max_context) if isinstance(max_context, int) else None,
                                chat_logprobs=logprobs, text_prompts=text_prompts,
                                llama_cpp=served[model].get("owned_by") == "llamacpp")
            top = (lp.get("top_logprobs") or [None])[0]
            spelled = lp.get("tokens") or []
            token_ids = "token_ids" in choice or bool(spelled and spelled[0].startswith(TOKEN_ID))
            return Features(model, token_ids, bool(lp.get("token_logprobs")), trial.get("logprobs", 0) if top else 0,
                            int(max_context) if isinstance(max_context, int) else None, text_prompts=text_prompts)

    def _try(self, client: httpx.Client, model: str, prompt) -> tuple[dict, httpx.Response]:
        """One greedy token of `prompt`, asking for the most the server may give and then less: the
        request that succeeded and its response, or the last refusal (a 4xx, or the 500 some servers
        answer a prompt type they do not take with)."""
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "logprobs": CONFIDENCE_TOP_K, "return_token_ids": True, "return_tokens_as_token_ids": True}
        for attempt in ({}, {"logprobs": 5}, {"logprobs": 5, "return_token_ids": None,
                                              "return_tokens_as_token_ids": None}, {"logprobs": None}):
            trial = {k: v for k, v in {**body, **attempt}.items() if v is not None}
            r = client.post(self.base_url + "/completions", json=trial)
            if r.status_code == 200:
                return trial, r
            if r.status_code not in (400, 422, 500):
                raise RkscError(f"{r.status_code} from {self.base_url}/completions: {_error_text(r.text)}")
        return trial, r


def _parse_content(seq: Sequence, content: list[dict], choice: dict, tokenizer) -> _Event:
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
    return _Event(seq, tokens, logprobs, tops)


def _is_question(seq: Sequence) -> bool:
    """A verifier question: prompt-only, its next-token distribution is what it asks for."""
    return seq.options.keep_logits and seq.max_tokens == 0


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    try:
        return min(float(resp.headers.get("retry-after", "")), 30.0)
    except ValueError:
        return 0.5 * 2 ** attempt


def _error_text(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300] or "(empty body)"


def _message(e: Exception, url: str) -> str:
    if isinstance(e, RkscError):
        return str(e)
    if isinstance(e, httpx.ConnectError):
        return f"cannot reach {url}: {e}"
    if isinstance(e, httpx.TimeoutException):
        return f"{url} timed out ({type(e).__name__})"
    return f"request to {url} failed: {type(e).__name__}: {e}"
