"""The HTTP server: an OpenAI-compatible API on FastAPI, one engine loop behind it.

    POST /v1/completions, /v1/chat/completions   OpenAI fields; SSE with stream=true
    POST /v1/solve                               a whole rksc solve (branches, verifier, selection)
    GET  /v1/models, /health, /metrics, /openapi.json (rksc.server.openapi)

The model loads in a background thread once the server listens: until then /health and the API
answer 503. Every admitted request counts against `max_queue` until it is answered or its client
goes away; beyond that a request gets 429 with Retry-After. A client that disconnects (or closes
its stream) has its job cancelled at once, which returns its KV blocks to the pool. Errors are
OpenAI error bodies; an error after a stream began arrives as an error chunk, then [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from rksc import validate
from rksc.engine.completion import completion
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Asks
from rksc.errors import RkscError
from rksc.models.loader import load as load_model
from rksc.reasoning.solver import SolveConfig, Solver, default_kv_budget
from rksc.server import metrics, openapi, protocol
from rksc.server.auth import ApiKey
from rksc.server.choices import Choices
from rksc.server.config import ServerConfig, bind
from rksc.server.loop import Done, EngineLoop, Failed, Job, Started
from rksc.server.protocol import ApiError, invalid
from rksc.server.text import ChoiceText, chat_ids, prompt_ids

log = logging.getLogger("rksc.server")
MAX_BODY_BYTES = 8 << 20  # a request body beyond this gets 413 (a full-context prompt as token ids is < 1 MiB)
RETRY_AFTER_S = 1  # told to a client refused for a full queue (a slot frees as soon as any request ends)
BODY_TIMEOUT_S = 30.0  # a body still arriving after this gets 408 (a slow sender holds no slot forever)


class ServerState:
    """What the handlers share; touched only on the event loop, except the loading thread's result."""

    def __init__(self, config: ServerConfig, load: Callable):
        self.config, self.load = config, load
        self.lm = self.solver = None
        self.asks: dict = {}  # the server's ASKS setting, applied to every /v1/solve
        self.completion_asks: Asks | None = None  # the same, as completions' sequences take it
        self.loop: EngineLoop | None = None
        self.error: str | None = None  # why loading failed
        self.loaded = threading.Event()
        self.in_flight = 0
        self.requests: Counter = Counter()  # (path, status) -> responses

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.loop.alive

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="rksc-load", daemon=True).start()

    def _load(self) -> None:
        try:
            lm = self.load()
            c = self.config
            budget = c.kv_budget or default_kv_budget()
            validate.kv_budget_fits(budget)
            solver = Solver(lm, kv_budget=budget, block_size=c.block_size, evict=c.evict, max_rows=c.max_rows)
            solver.engine.warm_up(lm.max_context)
            self.asks = dict(asks=c.asks, asks_tau=c.asks_tau, asks_recompute=c.asks_recompute)
            self.completion_asks = solver.asks_settings(SolveConfig(**self.asks))
            loop = EngineLoop(solver.engine, frozenset(solver.eos))
            loop.start()
            self.lm, self.solver, self.loop = lm, solver, loop
        except RkscError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported on /health and by `rksc serve`, never swallowed
            log.exception("loading the model failed")
            self.error = f"loading the model failed: {type(e).__name__}: {e}"
        finally:
            self.loaded.set()

    def check_ready(self) -> None:
        if self.ready:
            return
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}")
        if self.loop is not None:
            raise ApiError(503, "the engine loop has stopped")
        raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})

    def check_model(self, model: str) -> None:
        if model != self.lm.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.lm.name}`",
                           "model", "model_not_found")

    def admit(self, job: Job) -> Lease:
        if self.in_flight >= self.config.max_queue:
            raise ApiError(429, f"the server has {self.in_flight} requests in flight, its limit (--max-queue "
                                f"{self.config.max_queue}); retry after {RETRY_AFTER_S} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        self.loop.submit(job)
        return Lease(self, job)


class Lease:
    """An admitted request: `close()` (safe to call twice) cancels its job unless it has ended and
    frees its place in the queue."""

    def __init__(self, state: ServerState, job: Job):
        self.state, self.job, self.closed = state, job, False

    def close(self, ended: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not ended:
            self.state.loop.cancel(self.job)
        self.state.in_flight -= 1


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work):
    """Await `work`; if the client goes away first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_body(request: Request) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {int(declared)} bytes, more than this server's limit of "
                            f"{MAX_BODY_BYTES}", code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():  # bounded also when no length was declared (chunked encoding)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body is more than this server's limit of {MAX_BODY_BYTES} "
                                        "bytes", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s ({size} bytes came)",
                       code="request_timeout") from None
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


# completions -------------------------------------------------------------------------------------

def _prompt_ids(state: ServerState, req: protocol.GenerateRequest) -> list[int]:
    tok = state.lm.tokenizer
    param = "messages" if req.chat else "prompt"
    try:
        ids = chat_ids(tok, req.messages) if req.chat else prompt_ids(tok, req.prompt)
    except RkscError as e:
        raise invalid(str(e), param) from None
    vocab = state.lm.model.get_input_embeddings().num_embeddings
    if not ids:
        raise invalid(f"{param} is empty (no tokens)", param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"prompt holds token id {bad}, outside this model's vocabulary of {vocab}", param)
    return ids


def _max_tokens(state: ServerState, req: protocol.GenerateRequest, n_prompt: int) -> int:
    context, pool = state.lm.max_context, state.loop.engine.pool
    param = "messages" if req.chat else "prompt"
    asked = req.max_tokens
    if n_prompt + (asked or 1) > context:
        raise invalid(f"prompt too long: {n_prompt} prompt tokens + {asked or 1} new tokens are more than "
                      f"{state.lm.name}'s context of {context} tokens", param, "context_length_exceeded")
    bs = pool.block_size

    def blocks(new: int) -> int:  # the prompt once, each choice its own tokens (+ a copied partial block)
        return -(-n_prompt // bs) + req.n * (-(-new // bs) + 1)

    if asked is None:  # up to the end of the context, or of what the KV pool holds
        asked = context - n_prompt
        while asked > 1 and blocks(asked) > pool.num_blocks:
            asked //= 2
    if blocks(asked) > pool.num_blocks:
        raise invalid(f"{req.n} choice(s) of {asked} tokens on a {n_prompt}-token prompt need more KV blocks "
                      f"than the server's pool holds ({pool.num_blocks} of {bs} tokens); ask for fewer "
                      "tokens or choices", "max_tokens", "kv_budget_exceeded")
    return asked


async def generate(request: Request, state: ServerState, req: protocol.GenerateRequest):
    state.check_model(req.model)
    ids = await asyncio.to_thread(_prompt_ids, state, req)  # a long prompt's tokenization never stalls other clients
    max_tokens = _max_tokens(state, req, len(ids))
    seed = req.seed if req.seed is not None else random.randrange(validate.MAX_SEED)
    sampling = Sampling(req.temperature, req.top_p, seed)
    job = Job(lambda: completion(state.loop.engine, ids, req.n, max_tokens, sampling, state.loop.eos,
                                 req.logprobs, state.completion_asks), watch=True)
    choices = Choices(job, state.loop, state.lm.tokenizer, ids, req.n, req.stop)
    reply = Reply(state, req, ids, choices)
    lease = state.admit(job)
    if req.stream:
        return StreamingResponse(_stream(lease, reply), media_type="text/event-stream",
                                 background=BackgroundTask(lease.close))
    try:
        body = await until_disconnect(request, reply.collect())
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        lease.close(ended=choices.done)
    return JSONResponse(body)


async def _stream(lease: Lease, reply: Reply):
    try:
        async for chunk in reply.chunks():
            yield sse(chunk)
    except ApiError as e:
        yield sse(e.body())
    finally:
        lease.close(ended=reply.choices.done)
    yield "data: [DONE]\n\n"


class Reply:
    """A completion or chat completion in OpenAI's shapes, whole or as stream chunks."""

    def __init__(self, state: ServerState, req: protocol.GenerateRequest, ids: list[int], choices: Choices):
        self.req, self.ids, self.choices = req, ids, choices
        self.model, self.tok = state.lm.name, state.lm.tokenizer
        self.id = protocol.new_id("chatcmpl" if req.chat else "cmpl")
        self.created = protocol.now()
        self.object = "chat.completion" if req.chat else "text_completion"
        self._token_text: dict[int, str] = {}

    def token_text(self, token: int) -> str:
        if self.req.tokens_as_ids:
            return f"token_id:{token}"
        if token not in self._token_text:
            self._token_text[token] = self.tok.decode([token])
        return self._token_text[token]

    def usage(self) -> dict:
        return protocol.usage(len(self.ids), self.choices.completion_tokens, self.choices.cached_tokens)

    def _logprobs(self, entries, offset: int):
        if self.req.logprobs is None:
            return None
        if self.req.chat:
            return protocol.chat_logprobs(entries, self.token_text)
        return protocol.completion_logprobs(entries, self.token_text, offset)

    async def collect(self) -> dict:
        n = self.req.n
        texts, tokens, entries, reasons = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        async for deltas in self.choices.deltas():
            for d in deltas:
                texts[d.index] += d.text
                tokens[d.index] += d.token_ids
                entries[d.index] += d.logprobs
                reasons[d.index] = d.finish_reason or reasons[d.index]
        out = []
        for i in range(n):
            choice = {"index": i, "logprobs": self._logprobs(entries[i], 0), "finish_reason": reasons[i]}
            if self.req.chat:
                choice["message"] = {"role": "assistant", "content": texts[i]}
            else:
                choice["text"] = texts[i]
            if self.req.return_token_ids:
                choice["token_ids"] = tokens[i]
            out.append(choice)
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": self.usage()}
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.ids
        return body

    async def chunks(self):
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        offsets = [0] * self.req.n
        if self.req.chat:
            for i in range(self.req.n):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        async for deltas in self.choices.deltas():
            for d in deltas:
                choice = {"index": d.index, "logprobs": self._logprobs(d.logprobs, offsets[d.index]),
                          "finish_reason": d.finish_reason}
                if self.req.chat:
                    choice["delta"] = {"content": d.text} if d.text else {}
                else:
                    choice["text"] = d.text
                if self.req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                offsets[d.index] += len(d.text)
                yield {**head, "choices": [choice]}
        if self.req.include_usage:
            yield {**head, "choices": [], "usage": self.usage()}


# solve ---------------------------------------------------------------------------------------------

def solve_cost(config) -> int:
    """The most tokens a solve may decode: every branch's max_tokens, and at each later depth of a
    tree the kept nodes' children (the verifier's questions come on top)."""
    nodes = config.branches * (1 + (config.depth - 1) * min(config.keep, config.branches))
    return nodes * config.max_new_tokens


def _check_solve(state: ServerState, config) -> None:
    context = state.lm.max_context
    if config.max_new_tokens >= context:
        raise invalid(f"max_tokens {config.max_new_tokens} is more than {state.lm.name}'s context of {context} "
                      "tokens holds after the problem", "max_tokens", "context_length_exceeded")
    cost, limit = solve_cost(config), state.config.max_solve_tokens
    if cost > limit:
        raise invalid(f"this solve may decode {cost:,} tokens (branches x max_tokens, x the nodes its tree adds), "
                      f"more than this server allows (--max-solve-tokens {limit:,}); ask for fewer branches, "
                      "tokens or depth", "max_tokens", "solve_too_large")


async def solve(request: Request, state: ServerState, req: protocol.SolveRequest):
    state.check_model(req.model)
    _check_solve(state, req.config)
    problem = {"question": req.question, "context": req.context}
    config = replace(req.config, **state.asks)  # the server's ASKS setting holds for every request
    job = Job(lambda: state.solver.program(problem, config), watch=req.stream)
    lease = state.admit(job)
    rid = protocol.new_id("solve")
    try:
        first = await until_disconnect(request, job.events.get())
    except ClientGone:
        lease.close()
        return JSONResponse({}, status_code=499)
    if isinstance(first, Failed):
        lease.close(ended=True)
        raise ApiError(first.status, first.message)
    if req.stream:
        return StreamingResponse(_solve_stream(lease, job, first, rid, state), media_type="text/event-stream",
                                 background=BackgroundTask(lease.close))
    ended = False
    try:
        event = first
        while not isinstance(event, (Done, Failed)):
            event = await until_disconnect(request, job.events.get())
        ended = True
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        lease.close(ended=ended)
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message)
    return JSONResponse(protocol.solve_response(event.result, rid, state.lm.name))


async def _solve_stream(lease: Lease, job: Job, event, rid: str, state: ServerState):
    """Chunks `{"object": "solve.chunk", "branch": i, "text": delta, "finish_reason"}` as branches
    generate (i: the order in which the program started them; the branch index at depth 1), then
    one `{"object": "solve.decision", ...}` with the whole solve response."""
    tok, eos, texts, ended = state.lm.tokenizer, state.loop.eos, {}, False
    head = {"id": rid, "object": "solve.chunk", "created": protocol.now(), "model": state.lm.name}
    try:
        while True:
            if isinstance(event, Failed):
                ended = True
                yield sse(ApiError(event.status, event.message).body())
                break
            if isinstance(event, Done):
                ended = True
                yield sse({**protocol.solve_response(event.result, rid, state.lm.name), "object": "solve.decision"})
                break
            if not isinstance(event, Started):
                for u in event:
                    if u.index not in texts:
                        texts[u.index] = ChoiceText(tok, u.prompt_tail or [], skip=eos)
                    text = texts[u.index].add(u.token_ids)
                    if u.stop_reason is not None:
                        text += texts[u.index].finish()
                    if text or u.stop_reason is not None:
                        yield sse({**head, "branch": u.index, "text": text,
                                   "finish_reason": u.stop_reason and protocol.finish_reason(u.stop_reason)})
            event = await job.events.get()
    finally:
        lease.close(ended=ended)
    yield "data: [DONE]\n\n"


# the app -------------------------------------------------------------------------------------------

def create_app(config: ServerConfig, load: Callable | None = None) -> FastAPI:
    """The app; `load()` returns the LoadedModel (default: rksc.models.loader.load of the config's
    model), called in a background thread once the server starts."""
    if load is None:
        def load():
            return load_model(config.model, config.dtype, config.threads, config.weights)

    state = ServerState(config, load)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start_loading()
        yield
        if state.loop is not None:
            state.loop.stop()

    app = FastAPI(title="rksc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rksc = state
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(metrics.RequestCounter, counts=state.requests)  # outermost: 401s are counted too

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok", "model": state.lm.name}
        status = "failed" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503)

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(state), media_type=metrics.CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi_document():
        return openapi.document(state.lm.name if state.ready else None)

    @app.get("/v1/models")
    async def models():
        state.check_ready()
        return {"object": "list", "data": [{"id": state.lm.name, "object": "model", "created": 0,
                                            "owned_by": "rksc", "max_model_len": state.lm.max_context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.check_ready()
        return await generate(request, state, protocol.generate_request(await read_body(request), chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.check_ready()
        return await generate(request, state, protocol.generate_request(await read_body(request), chat=True))

    @app.post("/v1/solve")
    async def solve_route(request: Request):
        state.check_ready()
        return await solve(request, state, protocol.solve_request(await read_body(request)))

    return app


def serve(config: ServerConfig, sock: socket.socket | None = None) -> int:
    """`rksc serve`: listen (on `sock` if given, bound by rksc.server.config.bind), load the model,
    answer until Ctrl-C; a failed load ends the server with its one-line RkscError."""
    import uvicorn

    sock = sock or bind(config.host, config.port)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False, timeout_keep_alive=30))
    state: ServerState = app.state.rksc

    def announce():
        state.loaded.wait()
        if state.error is not None:
            server.should_exit = True
        else:
            host, port = sock.getsockname()[:2]
            key = " (API key required)" if config.api_key else ""
            print(f"rksc: serving {state.lm.name} at http://{host}:{port}/v1{key}", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    print(f"rksc: listening on {config.host}:{sock.getsockname()[1]}; loading {config.model or 'the default model'}"
          " (/health answers 503 until it is ready)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if state.error is not None:
        raise RkscError(state.error)
    return 0
