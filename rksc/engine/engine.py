"""The engine: one model, one block pool, one scheduler that steps every live sequence together.

    engine = Engine(model, eos_ids)
    seq = engine.add(Sequence(prompt_ids, max_tokens=64))
    while not seq.finished:
        engine.step()

Requests reach it as sequences (`add`, `cancel`, `release`) or as programs: generators that add
sequences, yield the sequences they wait for, read their tokens and decide what to fork, score or
stop next. `run` keeps up to `concurrency` programs in flight and steps the engine between them,
so the rows of many problems share each decode step.

    def program(engine):
        seq = engine.add(Sequence(ids, max_tokens=32))
        yield [seq]                 # resumes once every listed sequence has finished
        return seq.token_ids

A program may also yield `Progress(seqs)`: it resumes after any step in which one of them gained
a token (early exit reads the streams this way and cancels sequences). `Programs` holds programs in
flight for an owner that steps the engine itself (`run` for a fixed list; the server's engine loop
for programs that arrive between steps).

A verifier question may carry a `LayerExit` (the engine then needs a `LogitLens`): its prefill step
stops after the first layer at which every question of the step has a decisive lens margin. Each
such sequence ends with `layer_margins`, `exit_layer` and `lens_score`, and with `logits` only
when the step ran every layer.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rksc.cache import DEFAULT_POLICY
from rksc.engine import blend
from rksc.engine.lens import LayerWatch, LogitLens
from rksc.engine.model_runner import ModelRunner
from rksc.engine.sampler import generator_for, sample_rows
from rksc.engine.scheduler import Scheduler, Step
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError

Program = Generator[Any, None, Any]


@dataclass
class Progress:
    """Yielded by a program: resume after the next step that gives any of `seqs` a token."""

    seqs: list[Sequence]
    since: int = -1  # the engine step at which it was yielded


@dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # tokens computed by decode steps
    prefill_tokens: int = 0  # prompt tokens computed by prefill steps (those read from the prefix index excluded)
    sampled: int = 0  # tokens generated (sampled after a prompt or a decode step)
    failed_steps: int = 0  # steps whose forward pass or sampling raised: their sequences ended with the error
    prefill_s: float = 0.0
    decode_s: float = 0.0
    rows_hist: dict[int, int] = field(default_factory=dict)  # decode rows per step -> steps
    lens_steps: int = 0  # prefill steps that ended prompts with a layer exit
    lens_layers: int = 0  # decoder layers those steps ran
    exit_layers_saved: int = 0  # decoder layers they skipped: every row had exited
    asks_steps: int = 0  # approximate prefills tried (a donor was found)
    asks_reused: int = 0  # of those, the ones whose similarity passed tau
    asks_tokens: int = 0  # prompt tokens in those steps
    asks_computed: int = 0  # tokens those steps computed through every layer
    asks_test_s: float = 0.0  # time spent on reuse and the similarity test


class Engine:
    def __init__(self, model, eos: Iterable[int] = (), kv_budget: int = 1 << 30, block_size: int = 16,
                 evict: str = DEFAULT_POLICY, max_rows: int = 64, prefill_chunk: int = 512,
                 lens: LogitLens | None = None):
        self.model = model
        self.eos = frozenset(eos)
        self.lens = lens  # reads the YES/NO margin of sequences with a layer exit
        self.runner = ModelRunner.create(model, kv_budget, block_size, evict)
        self.pool = self.runner.pool
        self.scheduler = Scheduler(self.pool, max_rows, prefill_chunk)
        self.stats = EngineStats()
        self._rotary = None  # built at the first approximate prefill (rksc.engine.blend)

    # ---- sequences ----
    def add(self, seq: Sequence) -> Sequence:
        if seq.layer_exit is not None and self.lens is None:
            raise ValueError("a sequence with a layer exit needs an engine with a LogitLens")
        if seq.generator is None:
            seq.generator = generator_for(seq.sampling, seq.branch)
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End a sequence now (waiting, running or held); its blocks return to the pool at once."""
        self.scheduler.cancel(seq)

    def release(self, seq: Sequence) -> None:
        """Drop a held sequence's blocks (after every waiting child has forked it)."""
        self.scheduler.release(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check(self) -> None:
        """Assert the pool's invariants with every live table (tests call this after each step)."""
        self.pool.check(self.scheduler.tables())

    def drop_cached(self) -> int:
        """Evict every cached (unreferenced) block: the next request starts with a cold prefix index."""
        dropped = 0
        while self.pool.evict() is not None:
            dropped += 1
        return dropped

    def step(self) -> list[Sequence]:
        """Run one scheduled step; returns the sequences that gained a token or finished."""
        step = self.scheduler.schedule()
        if step is None:
            return []
        t = time.perf_counter()
        watch = self._watch(step)
        try:
            logits = self.runner.run(step, watch) if step.asks is None else self._blend(step)
        except Exception as e:  # the step's sequences end with the error; nothing is left half-written
            self.scheduler.fail_step(step, f"{type(e).__name__}: {e}")
            self.stats.failed_steps += 1
            raise
        elapsed = time.perf_counter() - t
        st = self.stats
        st.steps += 1
        if step.decode:
            st.decode_steps += 1
            st.decode_rows += len(step.rows)
            st.decode_s += elapsed
            st.rows_hist[len(step.rows)] = st.rows_hist.get(len(step.rows), 0) + 1
        else:
            st.prefill_steps += 1
            st.prefill_tokens += sum(len(r.tokens) for r in step.rows)
            st.prefill_s += elapsed
        done = [r.seq for r in step.rows if r.last]
        if watch is not None:
            self._deliver(step, done, watch, stopped=logits is None)
        wants = [i for i, seq in enumerate(done) if seq.wants_token]
        for i, seq in enumerate(done):
            if seq.keep_logits and not seq.token_ids and logits is not None:
                seq.logits = logits[i].clone()
        sampled = {}
        if wants:
            st.sampled += len(wants)
            seqs = [done[i] for i in wants]
            rows = logits if len(wants) == len(done) else logits[wants]  # no copy when every row samples
            try:
                tokens, probs, confs, tops = sample_rows(
                    rows, [s.sampling for s in seqs], [s.generator for s in seqs],
                    [i for i, s in enumerate(seqs) if s.confidence],
                    {i: s.logprobs for i, s in enumerate(seqs) if s.logprobs is not None})
            except Exception as e:  # as a failed forward pass: the step's sequences end with the error
                self.scheduler.fail_step(step, f"{type(e).__name__}: {e}")
                st.failed_steps += 1
                raise
            sampled = {s.id: (t, p, confs.get(i)) for i, (s, t, p) in enumerate(zip(seqs, tokens, probs))}
            for i, (chosen, top) in tops.items():  # each sampled token is appended by postprocess
                seqs[i].token_logprobs.append(chosen)
                seqs[i].top_logprobs.append(top)
        self.scheduler.postprocess(done, sampled, st.steps)
        return done

    def _blend(self, step: Step):
        """An approximate prefill (rksc.engine.blend); blocks holding reused KV leave the prefix index."""
        if self._rotary is None:
            self._rotary = blend.Rotary(self.model)
        seq = step.rows[0].seq
        logits, report = blend.prefill(self.runner, self._rotary, step, step.asks, seq.asks)
        seq.asks_report = report
        st = self.stats
        st.asks_steps += 1
        st.asks_tokens += report["tokens"]
        st.asks_test_s += report["test_s"]
        if report["reused"]:
            st.asks_reused += 1
            st.asks_computed += report["recomputed"]
            seq.approximate = True
            self.scheduler.invalidate(step)  # approximate KV must never serve an exact prefix hit
        else:
            st.asks_computed += report["tokens"]
        return logits

    def _watch(self, step: Step) -> LayerWatch | None:
        """The lens watch of a step that ends prompts with a layer exit; it may stop early when
        every row ends a prompt (a row in the middle of a prompt needs every layer's KV)."""
        exits = [r.seq.layer_exit for r in step.rows if r.last]
        if not step.layer_exit or not exits:
            return None
        return LayerWatch(self.lens, exits, can_stop=len(exits) == len(step.rows))

    def _deliver(self, step: Step, done: list[Sequence], watch: LayerWatch, stopped: bool) -> None:
        """Leave each row's lens results on its sequence; a step that stopped early leaves blocks
        without the later layers' KV, which must not be reused."""
        for i, seq in enumerate(done):
            seq.layer_margins, seq.exit_layer, seq.lens_score = watch.margins[i], watch.exit_layer[i], watch.score(i)
        if stopped:
            self.scheduler.invalidate(step)
        st = self.stats
        st.lens_steps += 1
        st.lens_layers += watch.layers_run
        st.exit_layers_saved += self.runner.layers - watch.layers_run

    # ---- programs ----
    def run(self, programs: Iterable[Program], concurrency: int = 1,
            errors: tuple[type[BaseException], ...] = (RkscError,)) -> Iterator[tuple[int, Any]]:
        """Run programs, at most `concurrency` at a time, in the given order; yields (index, result)
        as each completes, where result is the program's return value or the exception it raised if
        that is one of `errors` (others propagate). A program that raises has run its `finally`.
        With Exception among `errors`, a step whose forward pass fails fails only the programs
        waiting on its sequences; otherwise its exception propagates."""
        return run_programs(self, programs, concurrency, errors)


def run_programs(engine, programs: Iterable[Program], concurrency: int = 1,
                 errors: tuple[type[BaseException], ...] = (RkscError,)) -> Iterator[tuple[int, Any]]:
    """`Engine.run` on anything with the engine's surface (has_work, step, stats): the local
    engine, or a remote backend (rksc.engine.remote)."""
    assert concurrency >= 1, concurrency
    source = enumerate(programs)
    flight = Programs(engine, errors)
    exhausted = False
    while True:
        moved = True
        while moved:  # start programs and resume every one whose wait is over
            moved = False
            while not exhausted and len(flight) < concurrency:
                try:
                    index, program = next(source)
                except StopIteration:
                    exhausted = True
                    break
                moved = True
                result = flight.start(index, program)
                if result is not None:
                    yield result
            for index in flight.ready():
                moved = True
                result = flight.resume(index)
                if result is not None:
                    yield result
        if not flight and exhausted:
            return
        if not engine.has_work:
            raise RuntimeError("programs wait for sequences that the engine does not have")
        failed = getattr(engine.stats, "failed_steps", 0)
        try:
            engine.step()
        except Exception:
            # a forward pass or sampling that raised has ended its step's sequences with the error:
            # with Exception among `errors`, the programs waiting on them fail with it (an RkscError
            # naming it) and the others go on
            if Exception not in errors or getattr(engine.stats, "failed_steps", 0) == failed:
                raise


class Programs:
    """Programs in flight on one engine, each suspended at its wait (a list of sequences or a
    `Progress`). The owner steps the engine and resumes the programs whose wait is over: `Engine.run`
    does so for a fixed list, a server for programs that arrive between steps. A program ends with
    its return value, or with the exception it raised if that is one of `errors`."""

    def __init__(self, engine: Engine, errors: tuple[type[BaseException], ...] = (RkscError,)):
        self.engine, self.errors = engine, errors
        self.waits: dict[Any, Any] = {}  # key -> what the program waits for
        self._programs: dict[Any, Program] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def start(self, key, program: Program) -> tuple[Any, Any] | None:
        """Run a new program to its first wait; returns (key, result) if it ended at once."""
        assert key not in self._programs, key
        self._programs[key] = program
        return self._advance(key, first=True)

    def ready(self) -> list:
        """Keys of the programs whose wait is over."""
        return [key for key, wait in self.waits.items() if self._ready(wait)]

    def resume(self, key) -> tuple[Any, Any] | None:
        """Resume a program to its next wait; returns (key, result) if it ended."""
        return self._advance(key)

    def close(self, key) -> None:
        """Abandon a program: GeneratorExit at its wait, so its `finally` cancels its sequences."""
        program = self._programs.pop(key, None)
        self.waits.pop(key, None)
        if program is not None:
            program.close()

    def _ready(self, wait) -> bool:
        if isinstance(wait, Progress):
            return any(s.last_step > wait.since or s.finished for s in wait.seqs)
        return all(s.finished for s in wait)

    def _advance(self, key, first: bool = False) -> tuple[Any, Any] | None:
        program = self._programs[key]
        self.waits.pop(key, None)
        try:
            wait = next(program) if first else program.send(None)
        except StopIteration as stop:
            del self._programs[key]
            return key, stop.value
        except self.errors as e:
            del self._programs[key]
            return key, e
        except BaseException:
            del self._programs[key]
            raise
        self.waits[key] = wait
        if isinstance(wait, Progress):
            wait.since = self.engine.stats.steps  # only steps after this point count
        return None


def last_logits(seqs: list[Sequence]) -> torch.Tensor:
    """Stacked next-token logits after each sequence's prompt ([R, V]); raises for failed ones."""
    for s in seqs:
        if s.stop_reason == "error":
            raise RkscError(s.error)
    return torch.stack([s.logits for s in seqs])
