"""The OpenAI wire format: request bodies checked into dataclasses, and responses, stream chunks
and errors built as OpenAI clients expect them.

Every check goes through rksc.validate, so a field gets the same one-line message as the CLI and
the Python API give, with the field named as the request spells it (`max_tokens`, not the CLI's
`max-tokens`). A bad field is an `ApiError` with status 400 and the field in `param`; the error
body is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, fields

from rksc import validate
from rksc.errors import RkscError
from rksc.reasoning.config import SolveConfig

MAX_N = 128  # choices per request
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 16
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens this way
ROLES = ("system", "developer", "user", "assistant")
# fields OpenAI defines that this server does not implement: accepted only at their defaults
UNSUPPORTED = {"suffix": (None, ""), "echo": (None, False), "frequency_penalty": (None, 0),
               "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "functions": (None, []), "tool_choice": (None, "none"), "audio": (None,), "prediction": (None,)}


class ApiError(Exception):
    """An HTTP error with an OpenAI error body."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             408: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _named(name: str, message: str) -> str:
    """validate names a field as the CLI does (max-tokens); the API shows it as sent (max_tokens)."""
    shown = validate.label(name)
    return name + message[len(shown):] if message.startswith(shown) else message


def _field(body: dict, name: str, check, default=None):
    value = body.get(name)
    if value is None:
        return default
    try:
        return check(name, value)
    except RkscError as e:
        raise invalid(_named(name, str(e)), name) from None


def _stop(name: str, value) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise RkscError(f"{name} must be a string or a list of at most {MAX_STOPS} strings")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise RkscError(f"{name} must hold non-empty strings (got {validate.show(s)})")
        validate.text(name, s)
    return stops


def _prompt(name: str, value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return validate.text(name, value)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise RkscError(f"{name} holds {len(value)} prompts; send one prompt per request (or use n for choices)")
    raise RkscError(f"{name} must be a string or a non-empty list of token ids")


def _content(part_name: str, content) -> str:
    if isinstance(content, str):
        return validate.text(part_name, content, empty_ok=True)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RkscError(f'{part_name} parts must be {{"type": "text", "text": ...}} (only text is supported)')
            texts.append(validate.text(part_name, part["text"], empty_ok=True))
        return "".join(texts)
    raise RkscError(f"{part_name} must be a string or a list of text parts")


def _messages(name: str, value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RkscError(f"{name} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RkscError(f"{name}[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RkscError(f"{name}[{i}].role must be one of {', '.join(ROLES)} (got {validate.show(role)})")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(f"{name}[{i}].content", m.get("content") or "")})
    return out


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    return _field(options, "include_usage", validate.boolean, False)


def _unsupported(body: dict) -> None:
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise invalid(f"{name} is not supported by this server", name)
    best_of = body.get("best_of")
    if best_of not in (None, 1, body.get("n", 1)):
        raise invalid("best_of is not supported by this server (use n)", "best_of")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise invalid("response_format other than text is not supported by this server", "response_format")


def _model(body: dict) -> str:
    if body.get("model") is None:
        raise invalid("model is required", "model")
    return _field(body, "model", validate.text)


# requests -----------------------------------------------------------------------------------------

@dataclass
class GenerateRequest:
    """A /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompt: str | list[int] | None = None  # completions
    messages: list[dict] | None = None  # chat
    n: int = 1
    max_tokens: int | None = None  # None: completions 16, chat up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed per request
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # alternatives reported per token; None: no log-probs at all
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # as vLLM: the prompt's and each choice's token ids
    tokens_as_ids: bool = False  # as vLLM's return_tokens_as_token_ids: log-probs name tokens "token_id:N"


def generate_request(body: dict, chat: bool) -> GenerateRequest:
    _unsupported(body)
    model = _model(body)
    kw: dict = {}
    if chat:
        kw["messages"] = _field(body, "messages", _messages)
        if kw["messages"] is None:
            raise invalid("messages is required", "messages")
        tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        kw["max_tokens"] = _field(body, tokens_name, lambda n, v: validate.integer(n, v, 1))
        if _field(body, "logprobs", validate.boolean, False):
            kw["logprobs"] = _field(body, "top_logprobs", lambda n, v: validate.integer(n, v, 0, MAX_TOP_LOGPROBS), 0)
        elif body.get("top_logprobs") is not None:
            raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    else:
        kw["prompt"] = _field(body, "prompt", _prompt)
        if kw["prompt"] is None:
            raise invalid("prompt is required", "prompt")
        kw["max_tokens"] = _field(body, "max_tokens", lambda n, v: validate.integer(n, v, 1), 16)
        kw["logprobs"] = _field(body, "logprobs", lambda n, v: validate.integer(n, v, 0, MAX_TOP_LOGPROBS))
    stream = _field(body, "stream", validate.boolean, False)
    return GenerateRequest(
        chat, model, n=_field(body, "n", lambda n, v: validate.integer(n, v, 1, MAX_N), 1),
        temperature=_field(body, "temperature", lambda n, v: validate.number(n, v, 0, 2), 1.0),
        top_p=_field(body, "top_p", lambda n, v: validate.number(n, v, above=0, maximum=1), 1.0),
        seed=_field(body, "seed", lambda n, v: validate.integer(n, v, 0, validate.MAX_SEED)),
        stop=_field(body, "stop", _stop, []), stream=stream, include_usage=_stream_options(body, stream),
        return_token_ids=_field(body, "return_token_ids", validate.boolean, False),
        tokens_as_ids=_field(body, "return_tokens_as_token_ids", validate.boolean, False), **kw)


@dataclass
class SolveRequest:
    """A /v1/solve request: one problem, solved by a whole rksc program."""

    model: str
    question: str
    context: str  # earlier chat messages, placed before the problem in the shared prefix
    config: object  # SolveConfig
    stream: bool = False


# API field -> SolveConfig field
SOLVE_FIELDS = {"branches": "branches", "select": "select", "verifier": "verifier", "verify": "verify",
                "depth": "depth", "keep": "keep", "max_tokens": "max_new_tokens", "temperature": "temperature",
                "top_p": "top_p", "seed": "seed", "hints": "hints", "answer_format": "answer_format",
                "early_stop": "early_stop"}


def solve_request(body: dict) -> SolveRequest:
    model = _model(body)
    if (body.get("problem") is None) == (body.get("messages") is None):
        raise invalid("give either problem (a string) or messages", "problem")
    context = ""
    if body.get("problem") is not None:
        question = _field(body, "problem", lambda n, v: validate.question(v))
    else:
        messages = _field(body, "messages", _messages)
        if messages[-1]["role"] != "user":
            raise invalid("the last message must be the user's problem", "messages")
        question = messages[-1]["content"]
        context = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages[:-1])
    known = SolveConfig.__dataclass_fields__
    kw = {}
    for api, name in SOLVE_FIELDS.items():
        if body.get(api) is not None:
            if name not in known:
                raise invalid(f"{api} is not supported by this server's rksc", api)
            kw[name] = body[api]
    try:
        config = SolveConfig(**kw)
    except RkscError as e:
        message = str(e)
        param = next((api for api, name in SOLVE_FIELDS.items()
                      if message.startswith(validate.label(name) + " ")), None)
        if param is None and "early-stop" in message:
            param = "early_stop"
        if param is not None:
            message = param + message[len(validate.label(SOLVE_FIELDS[param])):]
        raise invalid(message, param) from None
    return SolveRequest(model, question, context, config, _field(body, "stream", validate.boolean, False))


# responses ----------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _lp(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def completion_logprobs(entries: list[tuple[int, float, list]], token_text, offset: int) -> dict:
    """The legacy completions format: parallel lists, text offsets counted from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        text = token_text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(logprob))
        out["top_logprobs"].append({token_text(t): _lp(lp) for t, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list[tuple[int, float, list]], token_text) -> dict:
    def entry(token, logprob):
        text = token_text(token)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                        for token, logprob, top in entries]}


def finish_reason(stop_reason: str) -> str:
    """An engine stop reason as OpenAI names it."""
    return {"finished": "stop", "stop": "stop", "length": "length"}.get(stop_reason, stop_reason)


def solve_response(result, rid: str, model: str) -> dict:
    """The answer, the chosen branch and every branch of a SolveResult."""
    branches = []
    for b in result.branches:
        branches.append({"index": b.index, "text": b.text, "answer": b.answer, "confidence": b.confidence,
                         "verifier": b.verifier, "stop_reason": b.stop_reason, "tokens": b.tokens,
                         "depth": b.depth, "parent": b.parent, "hint": b.hint})
    prefix = result.prefix_tokens
    prompt = prefix + sum(len(b.prompt_ids) - prefix for b in result.branches if b.depth == 1)
    config = result.config
    return {"id": rid, "object": "solve", "created": now(), "model": model, "answer": result.answer,
            "chosen": result.chosen, "kind": result.kind, "branches": branches,
            "config": {f.name: getattr(config, f.name) for f in fields(config)},
            "timing": {"prefill_s": result.timing.prefill_s, "decode_s": result.timing.decode_s,
                       "verify_s": result.timing.verify_s, "total_s": result.timing.total_s},
            "early": result.early,
            "usage": usage(prompt, result.timing.new_tokens, result.kv_bytes.get("prefix_cached_tokens", 0))}
