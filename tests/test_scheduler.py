"""The scheduler with a fake model (tokens from a hash of the sequence): no sequence lost, no block
leaked, preemption, cancel and release keep every invariant, and every request ends with a reason."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rksc.cache import BlockPool, LRUPolicy
from rksc.engine.scheduler import Scheduler
from rksc.engine.sequence import STOP_REASONS, Sequence, Status

STOP = 7


def fake_step(scheduler: Scheduler, step_no: int) -> bool:
    """One engine step without a model: the next token is a function of the sequence's ids."""
    step = scheduler.schedule()
    if step is None:  # nothing could run: acceptable only if scheduling ended the last work (errors)
        return not scheduler.has_work
    for row in step.rows:  # what the model would read: exactly the slots the scheduler allocated
        assert len(row.slots) == len(row.tokens) and row.seq.num_computed == row.start + len(row.tokens)
    done = [r.seq for r in step.rows if r.last]
    sampled = {s.id: ((sum(s.ids) * 31 + s.num_tokens) % 40 + 1, 0.5, None) for s in done if s.wants_token}
    scheduler.postprocess(done, sampled, step_no)
    return True


def drain(scheduler: Scheduler, limit: int = 5000) -> None:
    for n in range(limit):
        if not scheduler.has_work:
            return
        assert fake_step(scheduler, n), "work left but nothing can be scheduled"
        scheduler.pool.check(scheduler.tables())
    raise AssertionError("did not finish")


def test_waiting_for_blocks_then_running_gives_every_sequence_its_tokens():
    scheduler = Scheduler(BlockPool(6, 4, LRUPolicy()), prefill_chunk=5)
    seqs = [Sequence([1 + i, 2, 3, 4, 5, 6], max_tokens=10) for i in range(4)]  # 16 tokens = 4 blocks each
    for s in seqs:
        scheduler.add(s)
    drain(scheduler)
    assert all(s.stop_reason in ("length", "finished") for s in seqs)
    assert all(len(s.token_ids) == 10 or s.token_ids[-1] == STOP for s in seqs if s.stop_reason == "length")
    assert scheduler.pool.num_used == 0


def test_alternates_prefill_and_decode_so_a_long_prompt_stalls_nobody_for_more_than_a_chunk():
    scheduler = Scheduler(BlockPool(64, 4, LRUPolicy()), prefill_chunk=8)
    short = Sequence([1, 2, 3], max_tokens=30)
    scheduler.add(short)
    fake_step(scheduler, 0)
    scheduler.add(Sequence(list(range(1, 100)), max_tokens=1))  # 99 tokens: 13 chunks
    kinds = []
    for n in range(1, 12):
        step = scheduler.schedule()
        kinds.append(step.decode)
        done = [r.seq for r in step.rows if r.last]
        scheduler.postprocess(done, {s.id: (5, 0.5, None) for s in done if s.wants_token}, n)
        assert sum(len(r.tokens) for r in step.rows) <= 8
    assert kinds == [True, False] * 5 + [True]  # the first step (prefill of the short prompt) came before


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.scheduler = Scheduler(BlockPool(24, 4, LRUPolicy()), max_rows=5, prefill_chunk=6)
        self.seqs: list[Sequence] = []
        self.steps = 0

    @rule(prompt=st.lists(st.integers(1, 4), min_size=1, max_size=30), max_tokens=st.integers(0, 12),
          hold=st.booleans())
    def add(self, prompt, max_tokens, hold):
        seq = Sequence(prompt, max_tokens, stop_ids=frozenset({STOP}), hold=hold)
        self.scheduler.add(seq)
        self.seqs.append(seq)

    def _holdable(self):
        return [s for s in self.seqs if s.finished and s.table is not None and not s.released]

    @precondition(lambda self: self._holdable())
    @rule(data=st.data(), extra=st.lists(st.integers(1, 4), min_size=1, max_size=6), max_tokens=st.integers(0, 8))
    def fork(self, data, extra, max_tokens):
        parent = data.draw(st.sampled_from(self._holdable()))
        child = Sequence(parent.ids + extra, max_tokens, stop_ids=frozenset({STOP}), parent=parent,
                         depth=parent.depth + 1, hold=data.draw(st.booleans()))
        self.scheduler.add(child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def cancel(self, data):
        self.scheduler.cancel(data.draw(st.sampled_from(self.seqs)))

    @precondition(lambda self: self._holdable())
    @rule(data=st.data())
    def release(self, data):
        self.scheduler.release(data.draw(st.sampled_from(self._holdable())))

    @rule(n=st.integers(1, 6))
    def step(self, n):
        for _ in range(n):
            if not self.scheduler.has_work:
                return
            assert fake_step(self.scheduler, self.steps)
            self.steps += 1

    @invariant()
    def consistent(self):
        sch = self.scheduler
        sch.pool.check(sch.tables())
        waiting, running = set(sch.waiting), set(sch.running)
        assert len(waiting) == len(sch.waiting) and len(running) == len(sch.running)
        assert len(running) <= sch.max_rows
        for s in self.seqs:
            assert (s in waiting) + (s in running) + s.finished == 1, s  # nothing lost, nothing twice
            if s.status is Status.WAITING:
                assert s.table is None
            if s.status is Status.RUNNING:
                assert s.num_computed <= s.num_tokens
                if s.decoding:
                    assert s.num_computed == s.num_tokens - 1  # only the last sampled token is pending
            if s.finished:
                assert s.stop_reason in STOP_REASONS
                assert s.table is None or (s.hold and s in sch.held)
                assert len(s.token_ids) <= s.max_tokens

    def teardown(self):
        drain(self.scheduler)
        for s in self.seqs:
            assert s.finished, s
            if s.stop_reason == "length":
                assert len(s.token_ids) == s.max_tokens
            if s.stop_reason == "finished":
                assert s.token_ids[-1] == STOP
            if s.stop_reason == "prefilled":
                assert s.max_tokens == 0
            if s.stop_reason == "error":
                assert "raise --kv-budget" in s.error
            self.scheduler.release(s)
        self.scheduler.pool.check([])
        assert self.scheduler.pool.num_used == 0  # every block back: free or cached


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
