"""The scheduler: which sequences run in the next engine step, and where their tokens' KV goes.

Torch-free bookkeeping over the block pool. Each step is either

- prefill: up to `prefill_chunk` prompt tokens, from sequences whose prompt is part-way done
  first, then from waiting sequences admitted in arrival order (a long prompt is cut into chunks,
  so running sequences never wait for more than one chunk); or
- decode: one token for every running sequence past its prompt, all requests packed together.

When both kinds of work exist the steps alternate. Sequences with a layer exit are prefilled in
steps of their own (a step that stops part-way through the model leaves the KV of its later layers
unwritten, which only sequences that end with the step may afford); when both those and other
prompts wait, their prefill steps take turns. A waiting sequence with a `parent` forks the
parent's blocks (copy-free) once the parent has finished; otherwise its leading blocks come from
the prefix index. Admission keeps one free block per decoding row in reserve; when a decode step
still cannot get its blocks, the newest running sequence is preempted (blocks freed, put back at
the head of the queue, recomputed later mostly from the prefix index). When one sequence is left
running and still cannot go on, the held sequences give up their blocks, oldest first (their
later forks compute the tokens instead). A sequence that cannot fit even then ends with an error
instead of waiting forever.

A waiting sequence with `asks` (approximate reuse) whose prompt, after its exact prefix, has runs
of tokens that an earlier exact prompt's KV holds (rksc.cache.donors) is admitted with its whole
remaining prompt as the one row of a step carrying the plan; the engine runs it with
rksc.engine.blend. Sequences with `asks` register their prompts as donors once computed exactly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rksc.cache import BlockPool, Copy, Slot
from rksc.cache.donors import Donors, Plan
from rksc.engine.sequence import Sequence, Status


@dataclass
class Row:
    seq: Sequence
    start: int  # position of the first token fed
    tokens: list[int]
    slots: list[Slot]
    last: bool  # the chunk ends the sequence's known tokens: its next-token logits are wanted


@dataclass
class Step:
    decode: bool
    rows: list[Row]
    copies: list[Copy] = field(default_factory=list)  # copy-on-write to do before the forward
    layer_exit: bool = False  # every row's sequence carries a layer exit
    asks: Plan | None = None  # an approximate prefill (ASKS) of its one row's whole remaining prompt


class Scheduler:
    def __init__(self, pool: BlockPool, max_rows: int = 64, prefill_chunk: int = 512):
        assert max_rows >= 1 and prefill_chunk >= 1, (max_rows, prefill_chunk)
        self.pool, self.max_rows, self.prefill_chunk = pool, max_rows, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.held: set[Sequence] = set()  # finished sequences that keep their blocks
        self._last_decode = False
        self._last_exit = True  # the kind of the last prefill step: other prompts go first
        self.preemptions = 0
        self._retry = False  # a held sequence gave up its blocks for a waiting one
        self.donors = Donors(pool)  # prompts with exact KV that ASKS sequences may read

    # ---- requests ----
    def add(self, seq: Sequence) -> None:
        assert seq.status is Status.WAITING and seq.table is None, seq
        if seq.parent is not None:
            assert not seq.parent.book.released, "fork of a released sequence"
            seq.parent.book.pending_children += 1
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at once: its blocks go back to the pool (full ones stay cached)."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            self._detach(seq)
            self._end(seq, "cancelled")
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._end(seq, "cancelled")
        else:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """The owner no longer needs a held sequence; its blocks go when no waiting child needs them."""
        seq.book.released = True
        self._maybe_free(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.running.remove(seq)
        self._end(seq, reason, error)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def tables(self) -> list:
        """Every live block table (for pool.check)."""
        return [s.table for s in [*self.running, *self.held] if s.table is not None]

    # ---- steps ----
    def schedule(self) -> Step | None:
        """The next step, or None when nothing can run now."""
        while True:
            decoders = [s for s in self.running if s.decoding]
            prefill = self.waiting or any(not s.book.prefilled for s in self.running)
            if prefill and not (decoders and not self._last_decode):
                step = self._prefill(len(decoders))
                if step.rows:
                    self._last_decode = False
                    return step
            decoders = [s for s in self.running if s.decoding]  # admission may have ended sequences
            if decoders:
                step = self._decode_step()
                if step.rows:
                    self._last_decode = True
                    return step
                continue  # every decoding row was preempted, or ended because it can never fit: look again
            if not self.running:
                if not self._retry:
                    return None
                self._retry = False
                continue
            # only prompts part-way done, and no block for their next chunk: make room
            if len(self.running) > 1:
                self.preempt(self.running[-1])
            elif not self._drop_held():
                self.finish(self.running[0], "error", self._too_big(self.running[0]))

    def _prefill(self, decoding: int) -> Step:
        """A prefill step of the other kind than the last one if it has rows, else of the same kind."""
        for exits in (not self._last_exit, self._last_exit):
            step = self._prefill_step(decoding, exits)
            if step.rows:
                self._last_exit = exits
                break
        return step

    def _prefill_step(self, decoding: int, exits: bool) -> Step:
        """Prompt chunks of the sequences with (`exits`) or without a layer exit."""
        step, budget = Step(False, [], layer_exit=exits), self.prefill_chunk
        for seq in [s for s in self.running if not s.book.prefilled and (s.options.layer_exit is not None) == exits]:
            if budget == 0:
                break
            budget -= self._chunk(seq, budget, step)
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_rows:
                break
            if (seq.options.layer_exit is not None) != exits:
                continue
            parent = seq.parent
            if parent is not None and not parent.finished:
                continue  # admitted once its parent has run
            if parent is not None and parent.table is None:  # the parent ended without blocks
                self._detach(seq)
                parent = None
            start = parent.num_computed if parent is not None else self.pool.cached_prefix(seq.ids)
            plan = self._asks_plan(seq, start)
            if plan is not None:
                if step.rows:
                    break  # an approximate prefill runs alone, in the next step
                asks = self._admit_asks(seq, parent, start, plan, decoding)
                if asks is not None:
                    return asks
            n = min(budget, seq.num_tokens - start)
            if parent is not None:
                assert seq.prompt_ids[:start] == parent.ids[:start], "a fork must extend its parent's tokens"
                assert n >= 1, "a forked sequence must add at least one token to its parent"
                cost = self.pool.append_cost(parent.table, n, fork=True)
            else:
                cost = self.pool.allocation_cost(seq.ids[:start + n])
            if cost + decoding > self.pool.num_available:
                if not self.running and not step.rows and cost > self.pool.num_available:
                    if self._drop_held():
                        self._retry = True  # the held blocks are free: schedule again
                        return step
                    self.waiting.remove(seq)  # cannot fit even with nothing else running
                    self._detach(seq)
                    self._end(seq, "error", self._too_big(seq))
                    continue
                break  # wait until running sequences free blocks
            self.waiting.remove(seq)
            if parent is not None:
                seq.table = self.pool.fork(parent.table, seq.depth)
                seq.out.approximate = parent.out.approximate
                self._detach(seq)
            else:
                seq.table, _, slots = self.pool.allocate_sequence(seq.ids[:start + n], seq.depth)
            seq.out.cached_tokens = start
            seq.status = Status.RUNNING
            self.running.append(seq)
            if parent is None:  # its first chunk is already allocated
                step.rows.append(Row(seq, seq.out.cached_tokens, seq.ids[seq.out.cached_tokens:seq.num_computed], slots,
                                     seq.num_computed == seq.num_tokens))
                budget -= n
            else:
                budget -= self._chunk(seq, budget, step)
        return step

    def _asks_plan(self, seq: Sequence, start: int) -> Plan | None:
        """Where a waiting sequence's prompt after its exact prefix can read other prompts' KV."""
        if seq.options.asks is None or not seq.options.asks.enabled or seq.num_tokens - start > 4 * self.prefill_chunk:
            return None
        return self.donors.plan(seq.prompt_ids, start, seq.options.asks.min_run) if not seq.token_ids else None

    def _admit_asks(self, seq: Sequence, parent: Sequence | None, start: int, plan: Plan,
                    decoding: int) -> Step | None:
        """Admit `seq` with its whole remaining prompt as the one row of an approximate prefill
        step; None when its blocks are not available now (it then takes the usual path)."""
        n = seq.num_tokens - start
        cost = (self.pool.append_cost(parent.table, n, fork=True) if parent is not None
                else self.pool.allocation_cost(seq.ids))
        if cost + decoding > self.pool.num_available:
            return None
        self.waiting.remove(seq)
        step = Step(False, [])
        if parent is not None:
            seq.table = self.pool.fork(parent.table, seq.depth)
            seq.out.approximate = parent.out.approximate
            self._detach(seq)
            slots, copy = self.pool.append(seq.table, seq.ids[start:])
            if copy is not None:
                step.copies.append(copy)
        else:
            seq.table, start, slots = self.pool.allocate_sequence(seq.ids, seq.depth)
        seq.out.cached_tokens = start
        seq.status = Status.RUNNING
        self.running.append(seq)
        step.rows.append(Row(seq, start, seq.ids[start:], slots, True))
        plan = self.donors.still_valid(plan)  # our own allocation may have evicted donor blocks
        if plan.start == start and plan.matched >= seq.options.asks.min_run:
            step.asks = plan
        return step

    def _chunk(self, seq: Sequence, budget: int, step: Step) -> int:
        """Append the next prompt chunk of a running sequence; returns the tokens taken."""
        start = seq.num_computed
        tokens = seq.ids[start:start + budget]
        if self.pool.append_cost(seq.table, len(tokens)) > self.pool.num_available:
            return 0
        slots, copy = self.pool.append(seq.table, tokens)
        if copy is not None:
            step.copies.append(copy)
        step.rows.append(Row(seq, start, tokens, slots, seq.num_computed == seq.num_tokens))
        return len(tokens)

    def _decode_step(self) -> Step:
        rows = [s for s in self.running if s.decoding]
        while sum(self.pool.append_cost(s.table, 1) for s in rows) > self.pool.num_available:
            victim = self.running[-1]
            if len(self.running) == 1:
                if self._drop_held():
                    continue
                self.finish(victim, "error", self._too_big(victim))
                return Step(True, [])
            self.preempt(victim)
            rows = [s for s in rows if s is not victim]
        step = Step(True, [])
        for seq in rows:
            start = seq.num_computed
            token = seq.ids[start:]
            assert len(token) == 1, (seq.id, len(token))
            slots, copy = self.pool.append(seq.table, token)
            if copy is not None:
                step.copies.append(copy)
            step.rows.append(Row(seq, start, token, slots, True))
        return step

    def postprocess(self, done: list[Sequence], sampled: dict[int, tuple[int, float]], step: int) -> None:
        """After a step: `done` are the sequences whose known tokens all have KV now; `sampled` maps
        the id of each that wants a token to (token, probability, confidence or None). Ends what is
        complete."""
        now = time.perf_counter()
        for seq in done:
            if not seq.book.prefilled and seq.options.asks is not None and not seq.out.approximate \
                    and seq.options.layer_exit is None:
                self.donors.add(seq.prompt_ids, seq.table)  # its prompt's KV is exact: others may read it
            seq.book.prefilled, seq.book.last_step = True, step
            seq.out.prefilled_at = seq.out.prefilled_at or now
            if seq.max_tokens == 0:
                self.finish(seq, "prefilled")
                continue
            if seq.id not in sampled:
                continue
            token, prob, conf = sampled[seq.id]
            seq.token_ids.append(token)
            seq.out.token_probs.append(prob)
            if conf is not None:
                seq.out.token_confs.append(conf)
            if token in seq.stop_ids:
                self.finish(seq, "finished")
            elif len(seq.token_ids) >= seq.max_tokens:
                self.finish(seq, "length")

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the head of the queue to be recomputed."""
        self.running.remove(seq)
        self.pool.free(seq.table)
        seq.table, seq.status, seq.book.prefilled = None, Status.WAITING, False
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_held(self) -> bool:
        """Free the blocks of the oldest held sequence, when nothing else makes room: forks not made yet
        then compute its tokens, mostly from the prefix index. False when no held sequence has blocks."""
        if not self.held:
            return False
        seq = min(self.held, key=lambda s: s.id)
        self.held.discard(seq)
        self.pool.free(seq.table)
        seq.table = None
        self.preemptions += 1
        return True

    def fail_step(self, step: Step, error: str) -> None:
        """The forward of `step` failed: its sequences end with the error; the blocks it wrote leave
        the prefix index."""
        self.invalidate(step)
        for row in step.rows:
            if row.seq.status is Status.RUNNING:
                self.finish(row.seq, "error", error)

    def invalidate(self, step: Step) -> None:
        """The forward of `step` did not write every layer's KV (it failed, or stopped early): the
        blocks it wrote leave the prefix index, so no later request reuses them."""
        self.pool.invalidate({block for row in step.rows for block, _ in row.slots})

    # ---- internals ----
    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.status, seq.stop_reason, seq.out.error = Status.FINISHED, reason, error
        if seq.table is not None and seq.hold and reason not in ("cancelled", "error"):
            self.held.add(seq)
            self._maybe_free(seq)
        elif seq.table is not None:
            self.pool.free(seq.table)
            seq.table = None

    def _detach(self, seq: Sequence) -> None:
        parent, seq.parent = seq.parent, None
        if parent is not None:
            parent.book.pending_children -= 1
            self._maybe_free(parent)

    def _maybe_free(self, seq: Sequence) -> None:
        if seq.book.released and seq.book.pending_children == 0 and seq.finished and seq.table is not None:
            self.pool.free(seq.table)
            seq.table = None
            self.held.discard(seq)

    def _too_big(self, seq: Sequence) -> str:
        return (f"KV budget too small: a sequence of {seq.num_tokens} tokens needs more than the "
                f"{self.pool.num_available} blocks of {self.pool.block_size} tokens left; raise --kv-budget, "
                "or run fewer branches or new tokens at once")
