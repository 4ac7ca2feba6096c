"""`rksc serve`: the OpenAI-compatible HTTP server, after its settings are checked."""

from __future__ import annotations

import os

from rksc.cli.common import check_asks, quiet_transformers
from rksc.kernels.machine import probe
from rksc.models.compute import choose
from rksc.models.loader import resolve
from rksc.models.registry import DEFAULT_MODEL
from rksc.server.app import serve
from rksc.server.config import ServerConfig, bind


def run(args) -> int:
    api_key = os.environ.get("RKSC_API_KEY") or None if args.api_key is None else args.api_key
    config = ServerConfig(model=args.model, dtype=args.dtype, weights=args.weights,
                          threads=args.threads, host=args.host, port=args.port,
                          max_queue=args.max_queue, kv_budget=args.kv_budget,
                          block_size=args.block_size, evict=args.evict, max_rows=args.max_rows,
                          max_solve_tokens=args.max_solve_tokens, asks=args.asks,
                          asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                          api_key=api_key)
    # each mistake is a one-line error before listening: an unknown or damaged model, a dtype or
    # weight format this machine cannot run, --asks on without a tau, a port in use
    resolve(config.model or DEFAULT_MODEL)
    choose(probe(), config.dtype, config.weights)
    check_asks(config.model, config.asks, config.asks_tau)
    sock = bind(config.host, config.port)
    quiet_transformers()
    return serve(config, sock)
