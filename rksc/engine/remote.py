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
only before its first token; an error after that ends the sequence with the error. What the
server's answers look like, and the probe that finds what it gives, are rksc.engine.wire's.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
from collections.abc import Iterable

import httpx
import torch

from rksc.engine.api import EngineStats
from rksc.engine.sampler import CONFIDENCE_TOP_K
from rksc.engine.sequence import Sequence, Status
from rksc.engine.wire import (TOKEN_ID, Event, Features, error_message, error_text, parse_choice,
                              probe, retry_after, retryable)
from rksc.errors import RkscError

RETRIES = 3  # attempts after the first, before a request's first token


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
        with httpx.Client(headers=self.headers, timeout=self.timeout) as client:
            self.features: Features = probe(client, self.base_url, tokenizer, model)
        self.stats = EngineStats()
        self.warnings: list[str] = []
        if self.features.text_prompts:
            self.warnings.append(f"{self.base_url} takes no token-id prompts: prompts are sent as text and "
                                 "tokenised by the server, so token boundaries, and with them exactness against "
                                 "a local run, are lost")
        if not self.features.token_ids:
            self.warnings.append(f"{self.base_url} returns no token ids: generated text is re-tokenised, "
                                 "so token counts and verifier prompts may differ slightly from a local run")
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
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
            self._events.put(Event(seq, end="prefilled"))
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


    # ---- events ----
    def _apply(self, seq: Sequence, ev: Event) -> None:
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
            self._events.put(Event(seq, end="error", error=error_message(e, self.base_url)))

    async def _stream(self, seq: Sequence, body: dict) -> None:
        verify = _is_question(seq)
        url = self.base_url + "/completions"
        for attempt in range(RETRIES + 1):
            started = False
            try:
                async with self._client.stream("POST", url, json=body) as resp:
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode("utf-8", "replace")
                        if retryable(resp.status_code) and attempt < RETRIES:
                            await asyncio.sleep(retry_after(resp, attempt))
                            continue
                        raise RkscError(f"{resp.status_code} from {url}: {error_text(text)}")
                    reason, cached, tops = None, None, []
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise RkscError(f"the server failed mid-stream: {error_text(data)}")
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
                    self._events.put(Event(seq, tops=tops, end=end, cached=cached))
                    return
            except (httpx.TransportError, httpx.TimeoutException):
                if started or attempt == RETRIES:
                    raise
                await asyncio.sleep(0.5 * 2 ** attempt)

    def _parse(self, seq: Sequence, choice: dict) -> Event:
        return parse_choice(seq, choice, self.tokenizer)


def _is_question(seq: Sequence) -> bool:
    """A verifier question: prompt-only, its next-token distribution is what it asks for."""
    return seq.options.keep_logits and seq.max_tokens == 0
