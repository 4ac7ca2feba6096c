"""The HTTP server: an OpenAI-compatible API on FastAPI, one engine loop behind it.

    POST /v1/completions, /v1/chat/completions   OpenAI fields; SSE with stream=true
    POST /v1/solve                               a whole rksc solve (branches, verifier, selection)
    GET  /v1/models, /health, /metrics, /openapi.json (rksc.server.openapi)

The model loads in a background thread once the server listens: until then /health and the API
answer 503. Every admitted request counts against `max_queue` until it is answered or its client
goes away; beyond that a request gets 429 with Retry-After. A client that disconnects (or closes
its stream) has its job cancelled at once, which returns its KV blocks to the pool. Errors are
OpenAI error bodies; an error after a stream began arrives as an error chunk, then [DONE].

This module is the wiring: routes, error handlers, middleware, the body limits and `serve()`. The
handlers are rksc.server.completions and rksc.server.solve; what they share is rksc.server.state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from rksc.errors import RkscError
from rksc.models.loader import load as load_model
from rksc.server import metrics, openapi, protocol
from rksc.server.auth import ApiKey
from rksc.server.completions import generate
from rksc.server.config import ServerConfig, bind
from rksc.server.protocol import ApiError, invalid
from rksc.server.solve import solve
from rksc.server.state import ServerState

log = logging.getLogger("rksc.server")
MAX_BODY_BYTES = 8 << 20  # a request body beyond this gets 413 (a full-context prompt as token ids is < 1 MiB)
BODY_TIMEOUT_S = 30.0  # a body still arriving after this gets 408 (a slow sender holds no slot forever)


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
