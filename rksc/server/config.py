"""The server's settings and its listening socket: light imports only, so `rksc serve` refuses a
bad flag or a busy port at once, before torch and the model load."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from rksc import validate
from rksc.cache import DEFAULT_POLICY, pool_args
from rksc.errors import RkscError


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # registry name, Hugging Face folder or .gguf (default: the registry's default)
    dtype: str = "auto"  # rksc.models.compute
    weights: str = "auto"
    threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64  # requests in flight (waiting or running) before 429
    kv_budget: int | None = None  # bytes for the KV block pool (default: a quarter of the free memory)
    block_size: int = 16
    evict: str = DEFAULT_POLICY
    max_rows: int = 64  # sequences decoded together at most
    max_solve_tokens: int = 1 << 20  # a /v1/solve that may decode more gets 400 (server.solve.solve_cost)
    asks: str = "auto"  # on: prompts may reuse other requests' KV approximately (rksc.engine.blend); auto: where the
    # model's calibration passed its answer guard
    asks_tau: float | None = None  # None: the model's ASKS calibration
    asks_recompute: float | None = None
    api_key: str | None = field(default=None, repr=False)  # every endpoint but /health needs it as a bearer token

    def __post_init__(self):
        if self.model is not None:
            validate.text("model", self.model)
        validate.dtype(self.dtype)
        validate.weights(self.weights)
        validate.thread_count(self.threads)
        validate.text("host", self.host)
        validate.integer("port", self.port, 0, 65535)
        validate.integer("max_queue", self.max_queue, 1)
        pool_args(self.kv_budget, self.block_size, self.evict)
        validate.integer("max_rows", self.max_rows, 1)
        validate.integer("max_solve_tokens", self.max_solve_tokens, 1)
        validate.choice("asks", self.asks, validate.ASKS)
        if self.asks_tau is not None:
            validate.number("asks_tau", self.asks_tau)
        if self.asks_recompute is not None:
            validate.number("asks_recompute", self.asks_recompute, minimum=0, maximum=1)
        if self.api_key is not None:
            validate.text("api_key", self.api_key)
            if not (self.api_key.isascii() and self.api_key.isprintable()) or " " in self.api_key:
                raise RkscError("--api-key must be printable ASCII without spaces")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port is a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RkscError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RkscError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock
