"""The engine: one model, one block pool, one scheduler that steps every live sequence together.

    engine = Engine(model, eos_ids)
    seq = engine.add(Sequence(prompt_ids, max_tokens=64))
    while not seq.finished:
        engine.step()

Requests reach it as sequences (`add`, `cancel`, `release`) or as programs (rksc.engine.driver):
generators that add sequences, yield the ones they wait for, and decide what to fork, score or stop
next. `run` keeps up to `concurrency` programs in flight, so the rows of many problems share each
decode step. The engine implements rksc.engine.api's `EngineAPI`.

A verifier question may carry a `LayerExit` (the engine then needs a `LogitLens`): its prefill step
stops after the first layer at which every question of the step has a decisive lens margin. Each
such sequence ends with its `out.lens` (margins, exit layer, score), and with `out.logits` only
when the step ran every layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from rksc.cache import DEFAULT_POLICY, PoolStats
from rksc.engine import blend
from rksc.engine.api import EngineStats
from rksc.engine.driver import Program, run_programs
from rksc.engine.lens import LayerWatch, LogitLens
from rksc.engine.paged_runner import PagedRunner
from rksc.engine.sampler import generator_for, sample_rows
from rksc.engine.scheduler import Scheduler, Step
from rksc.engine.sequence import LensRead, Sequence
from rksc.errors import RkscError

class Engine:
    def __init__(self, model, eos: Iterable[int] = (), kv_budget: int = 1 << 30, block_size: int = 16,
                 evict: str = DEFAULT_POLICY, max_rows: int = 64, prefill_chunk: int = 512,
                 lens: LogitLens | None = None):
        self.model = model
        self.eos = frozenset(eos)
        self.lens = lens  # reads the YES/NO margin of sequences with a layer exit
        self.runner = PagedRunner.create(model, kv_budget, block_size, evict)
        self.pool = self.runner.pool
        self.scheduler = Scheduler(self.pool, max_rows, prefill_chunk)
        self.stats = EngineStats()
        self._rotary = None  # built at the first approximate prefill (rksc.engine.blend)

    # ---- sequences ----
    def add(self, seq: Sequence) -> Sequence:
        if seq.options.layer_exit is not None and self.lens is None:
            raise ValueError("a sequence with a layer exit needs an engine with a LogitLens")
        if seq.book.generator is None:
            seq.book.generator = generator_for(seq.sampling, seq.options.branch)
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
            if seq.options.keep_logits and not seq.token_ids and logits is not None:
                seq.out.logits = logits[i].clone()
        sampled = {}
        if wants:
            st.sampled += len(wants)
            seqs = [done[i] for i in wants]
            rows = logits if len(wants) == len(done) else logits[wants]  # no copy when every row samples
            try:
                tokens, probs, confs, tops = sample_rows(
                    rows, [s.sampling for s in seqs], [s.book.generator for s in seqs],
                    [i for i, s in enumerate(seqs) if s.options.confidence],
                    {i: s.options.logprobs for i, s in enumerate(seqs) if s.options.logprobs is not None})
            except Exception as e:  # as a failed forward pass: the step's sequences end with the error
                self.scheduler.fail_step(step, f"{type(e).__name__}: {e}")
                st.failed_steps += 1
                raise
            sampled = {s.id: (t, p, confs.get(i)) for i, (s, t, p) in enumerate(zip(seqs, tokens, probs))}
            for i, (chosen, top) in tops.items():  # each sampled token is appended by postprocess
                seqs[i].out.token_logprobs.append(chosen)
                seqs[i].out.top_logprobs.append(top)
        self.scheduler.postprocess(done, sampled, st.steps)
        return done

    def _blend(self, step: Step):
        """An approximate prefill (rksc.engine.blend); blocks holding reused KV leave the prefix index."""
        if self._rotary is None:
            self._rotary = blend.Rotary(self.model)
        seq = step.rows[0].seq
        logits, report = blend.prefill(self.runner, self._rotary, step, step.asks, seq.options.asks)
        seq.out.asks_report = report
        st = self.stats
        st.asks_steps += 1
        st.asks_tokens += report["tokens"]
        st.asks_test_s += report["test_s"]
        if report["reused"]:
            st.asks_reused += 1
            st.asks_computed += report["recomputed"]
            seq.out.approximate = True
            self.scheduler.invalidate(step)  # approximate KV must never serve an exact prefix hit
        else:
            st.asks_computed += report["tokens"]
        return logits

    def _watch(self, step: Step) -> LayerWatch | None:
        """The lens watch of a step that ends prompts with a layer exit; it may stop early when
        every row ends a prompt (a row in the middle of a prompt needs every layer's KV)."""
        exits = [r.seq.options.layer_exit for r in step.rows if r.last]
        if not step.layer_exit or not exits:
            return None
        return LayerWatch(self.lens, exits, can_stop=len(exits) == len(step.rows))

    def _deliver(self, step: Step, done: list[Sequence], watch: LayerWatch, stopped: bool) -> None:
        """Leave each row's lens results on its sequence; a step that stopped early leaves blocks
        without the later layers' KV, which must not be reused."""
        for i, seq in enumerate(done):
            margins = watch.margins[i]
            seq.out.lens = LensRead(margins, watch.exit_layer[i], watch.score(i), self.runner.layers - len(margins))
        if stopped:
            self.scheduler.invalidate(step)
        st = self.stats
        st.lens_steps += 1
        st.lens_layers += watch.layers_run
        st.exit_layers_saved += self.runner.layers - watch.layers_run

    # ---- the rest of the engine interface (rksc.engine.api) ----
    def kv_bytes(self, seqs: Iterable[Sequence]) -> int:
        return self.runner.kv_bytes([s.table for s in seqs if s.table is not None])

    def block_bytes(self) -> int:
        return self.runner.block_bytes

    def close(self) -> None:
        """Nothing runs in the background."""

    def warm_up(self, context: int) -> None:
        """Take the KV memory now and run the largest steps a server will run (a whole prefill chunk,
        then every row decoding together), as vLLM's profile run does, so resident memory stays flat
        under load; the counters start from zero afterwards."""
        self.runner.kv.commit()
        sched, pool = self.scheduler, self.pool
        tokens = min(sched.prefill_chunk, context // 2, pool.num_blocks * pool.block_size // 4)
        rows = min(sched.max_rows, max(1, pool.num_blocks // 4 - 1))
        if tokens >= 2:
            prompt = [1 + i % 255 for i in range(tokens)]  # any ids: only the shapes matter
            prefix = self.add(Sequence(prompt, hold=True))
            for i in range(rows):
                self.add(Sequence(prompt + [1 + i % 255], 2, parent=prefix))
            self.release(prefix)
            while self.has_work:
                self.step()
            self.drop_cached()
        self.stats, pool.stats = EngineStats(), PoolStats()

    def run(self, programs: Iterable[Program], concurrency: int = 1,
            errors: tuple[type[BaseException], ...] = (RkscError,)) -> Iterator[tuple[int, Any]]:
        """rksc.engine.driver.run_programs on this engine."""
        return run_programs(self, programs, concurrency, errors)
