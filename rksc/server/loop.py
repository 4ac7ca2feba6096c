"""The engine loop: one thread owns the engine and steps it for every client at once.

Request handlers (on the asyncio event loop) never touch the engine. They hand a `Job` to
`EngineLoop.submit` and read its events from an asyncio queue; `cancel` ends a job and frees its
KV. Between steps the thread takes what arrived (new jobs, cancels), steps the engine while
anything has work, sends every job what its sequences gained, and resumes the programs whose
wait is over; when nothing has work it sleeps on its inbox.

    completion (GenerateJob): its n choices as sequences; with n > 1 the prompt is prefilled once
        (a held prompt-only sequence) and every choice forks it. Events: lists of `Update`, then
        `Done(cached_tokens)`.
    program (ProgramJob): a generator program as `Engine.run` takes (e.g. Solver.program).
        Events: `Started` once it reached its first wait, `Update`s for the sequences it generates
        with (when watched), then `Done(result)` or `Failed`.
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

from rksc.engine.engine import Engine, Programs, Progress
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Asks, Sequence
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
    result: object = None  # a program's return value
    cached_tokens: int = 0  # completions: prompt tokens whose KV came from the prefix index


@dataclass
class Failed:
    status: int  # 400: the request cannot be done (RkscError); 500: a bug or a failed step; 503: shutdown
    message: str


class Job:
    """One request as the loop sees it. Events go to `events` on the handler's event loop."""

    def __init__(self):
        self.id = next(_job_ids)
        self.aloop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            pass


class GenerateJob(Job):
    def __init__(self, prompt_ids: list[int], n: int, max_tokens: int, sampling: Sampling,
                 logprobs: int | None):
        super().__init__()
        self.prompt_ids, self.n, self.max_tokens = prompt_ids, n, max_tokens
        self.sampling, self.logprobs = sampling, logprobs
        self.prefix: Sequence | None = None
        self.seqs: list[Sequence] = []
        self.sent: list[int] = []
        self.ended: list[bool] = []


class ProgramJob(Job):
    def __init__(self, make: Callable[[], object], watch: bool = False):
        """`make()` returns the program (a generator); `watch`: send Updates for every sequence
        with tokens to generate that the program waits for (its branches), indexed in the order seen."""
        super().__init__()
        self.make, self.watch = make, watch
        self.streams: dict[Sequence, list] = {}  # watched sequence -> [index, tokens sent, ended]


@dataclass
class LoopStats:
    started_at: float = field(default_factory=time.monotonic)
    steps_failed: int = 0
    rate: deque = field(default_factory=deque)  # (time, tokens sampled so far)


class EngineLoop:
    def __init__(self, engine: Engine, eos: frozenset[int], asks: Asks | None = None):
        self.engine, self.eos, self.asks = engine, frozenset(eos), asks
        self.programs = Programs(engine, errors=(Exception,))
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
        """End a job (index None), or one choice of a completion (a stop string was found)."""
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
            idle = not self.engine.has_work and not self.programs.ready()
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
        if isinstance(job, ProgramJob):
            ended = self.programs.start(job.id, job.make())
            if ended is None:
                job.emit(Started())
            else:
                self._end_program(*ended)
            return
        add = self.engine.add
        prompt = job.prompt_ids
        if job.n > 1 and len(prompt) > 1:  # prefill once; each choice forks it and feeds the last token
            job.prefix = add(Sequence(prompt[:-1], hold=True, asks=self.asks))
        job.seqs = [add(Sequence(prompt, job.max_tokens, job.sampling, i, self.eos, parent=job.prefix,
                                 logprobs=job.logprobs, asks=self.asks)) for i in range(job.n)]
        if job.prefix is not None:
            self.engine.release(job.prefix)  # freed once every choice has forked it
        job.sent, job.ended = [0] * job.n, [False] * job.n

    def _cancel(self, job: Job, index: int | None) -> None:
        if job.id not in self.jobs:
            return  # already ended
        if isinstance(job, ProgramJob):
            del self.jobs[job.id]
            self.programs.close(job.id)  # its `finally` cancels its sequences
            return
        if index is not None:
            self.engine.cancel(job.seqs[index])
            return
        del self.jobs[job.id]
        for seq in [job.prefix, *job.seqs]:
            if seq is not None:
                self.engine.cancel(seq)

    def _step(self) -> None:
        if not self.engine.has_work:
            return
        try:
            self.engine.step()
        except Exception:  # the step's sequences have ended with the error; their jobs report it
            self.stats.steps_failed += 1
            log.exception("engine step failed")
        now, rate = time.monotonic(), self.stats.rate
        rate.append((now, self.engine.stats.sampled))
        while len(rate) > 2 and rate[1][0] < now - RATE_WINDOW_S:
            rate.popleft()

    def _deliver(self) -> None:
        """Send every job the tokens its sequences gained; end the completions that are done."""
        for job in list(self.jobs.values()):
            if isinstance(job, GenerateJob):
                updates = []
                for i, seq in enumerate(job.seqs):
                    if not job.ended[i]:
                        update = self._update(seq, i, job.sent[i])
                        if update is not None:
                            updates.append(update)
                            job.sent[i], job.ended[i] = len(seq.token_ids), seq.finished
                if updates:
                    job.emit(updates)
                if all(job.ended):
                    del self.jobs[job.id]
                    cached = (job.prefix or job.seqs[0]).cached_tokens
                    job.emit(Done(cached_tokens=cached))
            elif isinstance(job, ProgramJob) and job.watch:
                self._deliver_program(job)

    def _deliver_program(self, job: ProgramJob) -> None:
        wait = self.programs.waits.get(job.id)
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
        if seq.logprobs is not None:
            logprobs = list(zip(new, seq.token_logprobs[sent:], seq.top_logprobs[sent:]))
        return Update(index, new, logprobs, seq.stop_reason if seq.finished else None, seq.error)

    def _resume(self) -> None:
        while ready := self.programs.ready():
            for key in ready:
                ended = self.programs.resume(key)
                if ended is not None:
                    self._end_program(*ended)
        if self.programs and not self.engine.has_work:  # waits that no step can end: a bug in a program
            for key in list(self.programs.waits):
                self.programs.close(key)
                job = self.jobs.pop(key, None)
                if job is not None:
                    job.emit(Failed(500, "internal error: the program waits for sequences the engine does not have"))

    def _end_program(self, key: int, result) -> None:
        job = self.jobs.pop(key, None)
        if job is None:
            return
        if isinstance(job, ProgramJob) and job.watch:
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
        if isinstance(job, ProgramJob):
            self.programs.close(job.id)
        else:
            for seq in [getattr(job, "prefix", None), *getattr(job, "seqs", [])]:
                if seq is not None:
                    self.engine.cancel(seq)
        job.emit(Failed(status, message))

    def _fail_all(self, status: int, message: str) -> None:
        for job in list(self.jobs.values()):
            try:
                self._fail(job, status, message)
            except Exception:
                log.exception("engine loop: failing %s", job.id)
