"""The server's OpenAPI document (`GET /openapi.json`): what each endpoint accepts and answers.

Written from the checks in rksc.server.protocol, not derived from them, so it is a second
statement of the API that the fuzz test (tests/test_server_fuzz.py) holds the server to: requests
generated from it must get a 2xx or a 4xx with an OpenAI error body, never a 5xx. Optional fields
may be null (null means "the default", as in OpenAI's API) and unknown fields are ignored, so every
request object allows additional properties.
"""

from __future__ import annotations

from rksc import validate
from rksc.reasoning import early
from rksc.server import protocol


def _null(schema: dict) -> dict:
    """The schema, or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def _int(minimum: int | None = None, maximum: int | None = None) -> dict:
    bounds = {k: v for k, v in (("minimum", minimum), ("maximum", maximum)) if v is not None}
    return _null({"type": "integer", **bounds})


BOOL = _null({"type": "boolean"})
POLICIES = "|".join((*early.NAMES, "cgee"))  # early-exit policy names
TEXT = {"type": "string", "pattern": r"\S"}  # not empty, not only spaces
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
    "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string", "minLength": 1},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"],
    "properties": {"role": {"enum": list(protocol.ROLES)},
                   "content": _null({"anyOf": [{"type": "string"}, {"type": "array", "items": {
                       "type": "object", "required": ["type", "text"],
                       "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]})}}}
SAMPLING = {
    "n": _int(1, protocol.MAX_N),
    "temperature": _null({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _null({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "seed": _int(0, validate.MAX_SEED),
    "stop": _null({"anyOf": [TEXT, {"type": "array", "maxItems": protocol.MAX_STOPS, "items": TEXT}]}),
    "stream": BOOL,
    "stream_options": _null({"type": "object", "properties": {"include_usage": BOOL}}),
    "return_token_ids": BOOL,
    "return_tokens_as_token_ids": BOOL,
}
COMPLETION_REQUEST = {"type": "object", "required": ["model", "prompt"], "properties": {
    "model": {"type": "string"},
    "prompt": {"anyOf": [TEXT, {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                         {"type": "array", "minItems": 1, "maxItems": 1, "items": TEXT}]},
    "max_tokens": _int(1),
    "logprobs": _int(0, protocol.MAX_TOP_LOGPROBS),
    **SAMPLING}}
CHAT_REQUEST = {"type": "object", "required": ["model", "messages"], "properties": {
    "model": {"type": "string"},
    "messages": MESSAGES,
    "max_tokens": _int(1),
    "max_completion_tokens": _int(1),
    "logprobs": BOOL,
    "top_logprobs": _int(0, protocol.MAX_TOP_LOGPROBS),
    **SAMPLING}}
SOLVE_REQUEST = {"type": "object", "required": ["model"], "oneOf": [  # the problem, or a chat ending with it
    {"required": ["problem"], "properties": {"problem": TEXT, "messages": {"type": "null"}}},
    {"required": ["messages"], "properties": {"messages": MESSAGES, "problem": {"type": "null"}}}], "properties": {
    "model": {"type": "string"},
    "branches": _int(1, validate.MAX_BRANCHES),
    "max_tokens": _int(1),
    "select": _null({"enum": ["composite", "vote", "verifier"]}),
    "verifier": _null({"enum": ["auto", "continue", "prompt"]}),
    "verify": BOOL,
    "depth": _int(1, validate.MAX_DEPTH),
    "keep": _int(1),
    "temperature": _null({"type": "number", "minimum": 0}),
    "top_p": _null({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "seed": _int(0, validate.MAX_SEED),
    "hints": BOOL,
    "answer_format": _null({"enum": ["auto", "number", "choice", "math"]}),
    "early_stop": _null({"anyOf": [{"type": "string", "pattern": f"^({POLICIES})?(,({POLICIES}))*$"},
                                   {"type": "array", "items": {"enum": [*early.NAMES, "cgee"]}}]}),
    "stream": BOOL}}
# what a successful answer holds at least (a stream is text/event-stream: data lines, then [DONE])
ANSWER = {
    "completion": {"type": "object", "required": ["id", "object", "choices", "usage"],
                   "properties": {"object": {"const": "text_completion"}, "choices": {"type": "array"}}},
    "chat": {"type": "object", "required": ["id", "object", "choices", "usage"],
             "properties": {"object": {"const": "chat.completion"}, "choices": {"type": "array"}}},
    "solve": {"type": "object", "required": ["id", "object", "answer", "chosen", "branches", "usage"],
              "properties": {"object": {"const": "solve"}, "branches": {"type": "array", "minItems": 1}}},
}
ERRORS = {400: "a field is missing or wrong (`param` names it)", 401: "a missing or wrong API key",
          404: "no such model", 408: "the request body did not arrive in time", 413: "the body is too large",
          429: "the queue is full (see Retry-After)", 499: "the client went away",
          500: "the request's own computation failed", 503: "the model is loading or failed to load"}


def _responses(answer: dict | None, stream: bool) -> dict:
    out = {}
    if answer is not None:
        content = {"application/json": {"schema": answer}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"], "properties": {
                "data": {"type": "string"}}}}  # each event: a JSON chunk, an error body, or [DONE] last
        out["200"] = {"description": "the answer", "content": content}
    for status, why in ERRORS.items():
        out[str(status)] = {"description": why, "content": {"application/json": {"schema": ERROR}}}
    return out


def _post(summary: str, request: dict, answer: dict) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": request}}}, "responses": _responses(answer, stream=True)}}


def document(model: str | None = None) -> dict:
    """The OpenAPI 3.1 document; with `model`, requests name that model (the one this server serves)."""
    named = {"type": "string", **({"enum": [model]} if model else {})}

    def serving(request: dict) -> dict:
        return {**request, "properties": {**request["properties"], "model": named}}

    json_get = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "rksc", "version": "1",
                 "description": "OpenAI-compatible completions and chat, and whole multi-branch solves"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/completions": _post("a completion (OpenAI's legacy API)", serving(COMPLETION_REQUEST),
                                     ANSWER["completion"]),
            "/v1/chat/completions": _post("a chat completion", serving(CHAT_REQUEST), ANSWER["chat"]),
            "/v1/solve": _post("one problem solved by branches, a verifier and a selection", serving(SOLVE_REQUEST),
                               ANSWER["solve"]),
            "/v1/models": {"get": {"summary": "the served model", "responses": _responses(json_get, False)}},
            "/health": {"get": {"summary": "200 once the model is loaded", "security": [],
                                "responses": {"200": {"description": "ready", "content": {
                                    "application/json": {"schema": json_get}}},
                                    "503": {"description": "loading or failed", "content": {
                                        "application/json": {"schema": json_get}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _responses(None, False)["401"]}}},
        },
        "security": [{"bearer": []}],
    }
