"""What the server's handlers share: the model once loaded, the engine loop, and admission.

`ServerState` loads the model in a background thread (`start_loading`); until it is ready the API
answers 503 (`check_ready`). `admit` submits a job to the engine loop and counts it against
`max_queue` (beyond it: 429 with Retry-After) until its `Lease` is closed. Touched only on the
event loop, except the loading thread's result.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from rksc import validate
from rksc.engine.sequence import Asks
from rksc.errors import RkscError
from rksc.reasoning.config import SolveConfig
from rksc.reasoning.solver import Solver, default_kv_budget
from rksc.server.config import ServerConfig
from rksc.server.loop import EngineLoop, Job
from rksc.server.protocol import ApiError

log = logging.getLogger("rksc.server")
RETRY_AFTER_S = 1  # told to a client refused for a full queue (a slot frees as soon as any request ends)


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
