"""The engine loop: one thread owns the engine and steps it for every client at once.

Request handlers (on the asyncio event loop) never touch the engine. They hand a `Job` (a program,
rksc.engine.driver) to `EngineLoop.submit` and read its events from an asyncio queue; `cancel`
ends a job and frees its KV. The thread runs the same `Driver` as `Solver.solve_many`; only where
programs come from (the inbox, between steps) and where results go (the jobs' queues) differ.
Between steps it takes what arrived, steps the engine while anything has work, sends every job
what its sequences gained, and resumes the programs whose wait is over; when nothing has work it
sleeps on its inbox.

A completion is rksc.engine.completion's program, a solve is `Solver.program`. Events: `Started`
once the program reached its first wait, lists of `Update` for the sequences with tokens to
generate that it waits for (when watched), then `Done(result)` or `Failed`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rksc.engine.driver import Driver, Progress
from rksc.engine.engine import Engine
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError

log = logging.getLogger("rksc.server")
_job_ids = itertools.count()
RATE_WINDOW_S = 10.0  # tokens/s is measured over this much recent time


@dataclass
class Update:
    """What one stream (a choice, or a branch of a program) gained since its last update."""

    index: int
    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None  # (token, log p, top (id, log p))
    stop_reason: str | None = None  # set once it ended: finished, length, cancelled, error
    error: str | None = None
    prompt_tail: list[int] | None = None  # in a stream's first update: the end of its prompt (for decoding)


@dataclass
class Started:
    pass


@dataclass
class Done:
    result: object = None  # the program's return value (a completion's: prompt tokens the prefix index served)


@dataclass
class Failed:
    status: int  # 400: the request cannot be done (RkscError); 500: a bug or a failed step; 503: shutdown
    message: str


class Job:
    """One request as the loop sees it: a program and where its events go (the handler's event loop).
    `make()` returns the program; `watch`: send Updates for every sequence with tokens to generate
    that the program waits for (its branches, a completion's choices), indexed in the order seen."""

    def __init__(self, make: Callable[[], object], watch: bool = False):
        self.id = next(_job_ids)
        self.make, self.watch = make, watch
        self.streams: dict[Sequence, list] = {}  # watched sequence -> [index, tokens sent, ended]
        self.aloop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            pass


@dataclass
class LoopStats:
    started_at: float = field(default_factory=time.monotonic)
    steps_failed: int = 0
    rate: deque = field(default_factory=deque)  # (time, tokens sampled so far)


class EngineLoop:
    def __init__(self, engine: Engine, eos: frozenset[int]):
        self.engine, self.eos = engine, frozenset(eos)
        self.driver = Driver(engine, errors=(Exception,))
        self.jobs: dict[int, Job] = {}  # live jobs by id (touched by the loop thread only)
        self.stats = LoopStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rksc-engine", daemon=True)

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job, None))

    def cancel(self, job: Job, index: int | None = None) -> None:
        """End a job (index None), or one of its watched streams (a choice whose stop string was found)."""
        self._inbox.put(("cancel", job, index))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def tokens_per_second(self) -> float:
        rate = self.stats.rate
        if len(rate) < 2 or rate[-1][0] <= rate[0][0]:
            return 0.0
        return (rate[-1][1] - rate[0][1]) / (rate[-1][0] - rate[0][0])

    # ---- the loop thread ----
    def _run(self) -> None:
        while True:
            idle = not self.engine.has_work and not self.driver.ready()
            if not self._take(block=idle):
                break
            try:
                self._step()
                self._deliver()
                self._resume()
            except Exception as e:  # a bug: the live jobs end with it, the loop goes on for new ones
                log.exception("engine loop")
                self._fail_all(500, f"internal error: {type(e).__name__}: {e}")
        self._fail_all(503, "the server is shutting down")

    def _take(self, block: bool) -> bool:
        """Handle what arrived; wait for something first if `block`. False once told to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if command is None:
                return False
            block = False
            action, job, index = command
            try:
                if action == "submit":
                    self._open(job)
                else:
                    self._cancel(job, index)
            except Exception as e:
                log.exception("engine loop: %s", action)
                self._fail(job, 500, f"internal error: {type(e).__name__}: {e}")

    def _open(self, job: Job) -> None:
        self.jobs[job.id] = job
        ended = self.driver.start(job.id, job.make())
        if ended is None:
            job.emit(Started())
        else:
            self._end_program(*ended)

    def _cancel(self, job: Job, index: int | None) -> None:
        if job.id not in self.jobs:
            return  # already ended
        if index is not None:
            seq = next((s for s, state in job.streams.items() if state[0] == index), None)
            if seq is not None:
                self.engine.cancel(seq)
            return
        del self.jobs[job.id]
        self.driver.close(job.id)  # its `finally` cancels its sequences

    def _step(self) -> None:
        if not self.engine.has_work:
            return
        try:
            error = self.driver.step()
        except Exception as e:  # the step's sequences have ended with the error; their jobs report it
            error = e
        if error is not None:
            self.stats.steps_failed += 1
            log.error("engine step failed", exc_info=error)
        now, rate = time.monotonic(), self.stats.rate
        rate.append((now, self.engine.stats.sampled))
        while len(rate) > 2 and rate[1][0] < now - RATE_WINDOW_S:
            rate.popleft()

    def _deliver(self) -> None:
        """Send every watching job the tokens its sequences gained."""
        for job in list(self.jobs.values()):
            if job.watch:
                self._deliver_program(job)

    def _deliver_program(self, job: Job) -> None:
        wait = self.driver.waits.get(job.id)
        seqs = wait.seqs if isinstance(wait, Progress) else (wait or [])
        for seq in seqs:
            if seq.max_tokens > 0 and seq not in job.streams:
                job.streams[seq] = [len(job.streams), 0, False]
        updates = []
        for seq, state in job.streams.items():
            index, sent, ended = state
            if not ended:
                update = self._update(seq, index, sent)
                if update is not None:
                    if sent == 0:  # its first update
                        update.prompt_tail = seq.prompt_ids[-8:]
                    updates.append(update)
                    state[1], state[2] = len(seq.token_ids), seq.finished
        if updates:
            job.emit(updates)

    @staticmethod
    def _update(seq: Sequence, index: int, sent: int) -> Update | None:
        new = seq.token_ids[sent:]
        if not new and not seq.finished:
            return None
        logprobs = None
        if seq.options.logprobs is not None:
            logprobs = list(zip(new, seq.out.token_logprobs[sent:], seq.out.top_logprobs[sent:]))
        return Update(index, new, logprobs, seq.stop_reason if seq.finished else None, seq.out.error)

    def _resume(self) -> None:
        for ended in self.driver.resume_ready():
            self._end_program(*ended)
        for key in self.driver.stalled():  # waits that no step can end: a bug in a program
            self.driver.close(key)
            job = self.jobs.pop(key, None)
            if job is not None:
                job.emit(Failed(500, "internal error: the program waits for sequences the engine does not have"))

    def _end_program(self, key: int, result) -> None:
        job = self.jobs.pop(key, None)
        if job is None:
            return
        if job.watch:
            self._deliver_program(job)  # the last tokens and stop reasons of its streams
        if isinstance(result, RkscError):
            job.emit(Failed(400, str(result)))
        elif isinstance(result, Exception):
            log.error("program failed", exc_info=result)
            job.emit(Failed(500, f"internal error: {type(result).__name__}: {result}"))
        else:
            job.emit(Done(result=result))

    def _fail(self, job: Job, status: int, message: str) -> None:
        self.jobs.pop(job.id, None)
        self.driver.close(job.id)
        job.emit(Failed(status, message))

    def _fail_all(self, status: int, message: str) -> None:
        for job in list(self.jobs.values()):
            try:
                self._fail(job, status, message)
            except Exception:
                log.exception("engine loop: failing %s", job.id)
