"""API keys: with `--api-key`, every request but `/health` must carry `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from rksc.server.protocol import ApiError

OPEN_PATHS = frozenset({"/health"})  # load balancers and probes ask it without a key


class ApiKey:
    """ASGI middleware: a request without the key gets 401 with an OpenAI error body, before any
    route reads its body."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) == 1 and hmac.compare_digest(given[0], self.expected):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>' (the key `rksc serve "
                   "--api-key` was started with)" if not given else "incorrect API key")
        error = ApiError(401, message, code="invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
