"""The scheduler with a fake model (tokens from a hash of the sequence): no sequence lost, no block
leaked, preemption, cancel and release keep every invariant, every request ends with a reason, and
sequences with a layer exit never share a prefill step with others."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rksc.cache import BlockPool, LRUPolicy
from rksc.engine.scheduler import Scheduler
from rksc.engine.sequence import STOP_REASONS, LayerExit, Sequence, Status

STOP = 7


def fake_step(scheduler: Scheduler, step_no: int) -> bool:
    """One engine step without a model: the next token is a function of the sequence's ids."""
    step = scheduler.schedule()
    if step is None:  # nothing could run: acceptable only if scheduling ended the last work (errors)
        return not scheduler.has_work
    assert step.rows, "a step without rows (the engine cannot run it)"
    for row in step.rows:  # what the model would read: exactly the slots the scheduler allocated
        assert len(row.slots) == len(row.tokens) and row.seq.num_computed == row.start + len(row.tokens)
        assert (row.seq.options.layer_exit is not None) == step.layer_exit, "layer exits share a step with others"
    done = [r.seq for r in step.rows if r.last]
    if step.layer_exit and len(done) == len(step.rows):  # the model may stop part-way, as the engine's does
        scheduler.invalidate(step)
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


def test_layer_exit_prompts_take_turns_with_other_prompts():
    scheduler = Scheduler(BlockPool(64, 4, LRUPolicy()), prefill_chunk=8)
    seqs, kinds = [], []
    for n in range(6):  # a stream of both kinds, each more than one step can take
        seqs += [Sequence([1 + n, 2, 3, 4, 5, 6, 7, 8]), Sequence([9, n, 3, 4, 5], layer_exit=LayerExit(1.0))]
        scheduler.add(seqs[-2])
        scheduler.add(seqs[-1])
        step = scheduler.schedule()
        kinds.append(step.layer_exit)
        assert all((r.seq.options.layer_exit is not None) == step.layer_exit for r in step.rows)
        scheduler.postprocess([r.seq for r in step.rows if r.last], {}, n)
    assert kinds == [False, True] * 3
    drain(scheduler)
    assert all(s.stop_reason == "prefilled" for s in seqs)


def test_blocks_of_a_step_that_stopped_early_are_not_reused():
    scheduler = Scheduler(BlockPool(16, 4, LRUPolicy()), prefill_chunk=16)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ask = Sequence(prompt, layer_exit=LayerExit(0.0))
    scheduler.add(ask)
    step = scheduler.schedule()
    scheduler.invalidate(step)  # the forward stopped after an early layer
    scheduler.postprocess([ask], {}, 0)
    scheduler.pool.check(scheduler.tables())
    for n, expected in enumerate([0, 8]):  # the second reuses the blocks the first computed in full
        seq = Sequence(prompt)
        scheduler.add(seq)
        scheduler.schedule()
        scheduler.postprocess([seq], {}, n + 1)
        assert seq.out.cached_tokens == expected


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.scheduler = Scheduler(BlockPool(24, 4, LRUPolicy()), max_rows=5, prefill_chunk=6)
        self.seqs: list[Sequence] = []
        self.steps = 0

    @rule(prompt=st.lists(st.integers(1, 4), min_size=1, max_size=30), max_tokens=st.integers(0, 12),
          hold=st.booleans(), layer_exit=st.booleans())
    def add(self, prompt, max_tokens, hold, layer_exit):
        if layer_exit:
            max_tokens, hold = 0, False
        seq = Sequence(prompt, max_tokens, stop_ids=frozenset({STOP}), hold=hold,
                       layer_exit=LayerExit(1.0) if layer_exit else None)
        self.scheduler.add(seq)
        self.seqs.append(seq)

    def _holdable(self):
        return [s for s in self.seqs if s.finished and s.table is not None and not s.book.released]

    @precondition(lambda self: self._holdable())
    @rule(data=st.data(), extra=st.lists(st.integers(1, 4), min_size=1, max_size=6), max_tokens=st.integers(0, 8))
    def fork(self, data, extra, max_tokens):
        parent = data.draw(st.sampled_from(self._holdable()))
        layer_exit = data.draw(st.booleans())  # a verifier question about the parent
        child = Sequence(parent.ids + extra, 0 if layer_exit else max_tokens, stop_ids=frozenset({STOP}),
                         parent=parent, depth=parent.depth + 1, hold=not layer_exit and data.draw(st.booleans()),
                         layer_exit=LayerExit(1.0) if layer_exit else None)
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
                assert "raise --kv-budget" in s.out.error
            self.scheduler.release(s)
        self.scheduler.pool.check([])
        assert self.scheduler.pool.num_used == 0  # every block back: free or cached


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


def test_a_decoder_that_outgrows_the_pool_ends_with_an_error_and_no_empty_step_is_scheduled():
    scheduler = Scheduler(BlockPool(2, 2, LRUPolicy()), prefill_chunk=1)
    grows = Sequence([100, 5], max_tokens=4)  # 6 tokens: 3 blocks, the pool has 2
    other = Sequence([101, 5, 5], max_tokens=1)
    for s in (grows, other):
        scheduler.add(s)
    drain(scheduler)  # fake_step fails on a step without rows
    assert grows.stop_reason == "error" and "raise --kv-budget" in grows.out.error
    assert other.stop_reason in ("length", "finished") and len(other.token_ids) == 1
    assert scheduler.pool.num_used == 0


def run_forks(num_blocks: int) -> tuple[list[Sequence], Scheduler]:
    """Two held prefixes filling the pool, then a fork of each that needs more blocks than are free."""
    scheduler = Scheduler(BlockPool(num_blocks, 2, LRUPolicy()))
    prefixes = [Sequence([1, 2, 3], hold=True), Sequence([4, 5, 6], hold=True)]  # 2 blocks each
    for p in prefixes:
        scheduler.add(p)
    fake_step(scheduler, 0)
    assert all(p.finished for p in prefixes) and scheduler.pool.num_used == 4
    forks = [Sequence([1, 2, 3, 9], max_tokens=3, parent=prefixes[0]),  # 7 tokens: every block of a 4-block pool
             Sequence([4, 5, 6, 9], max_tokens=1, parent=prefixes[1])]
    for f in forks:
        scheduler.add(f)
    for p in prefixes:
        scheduler.release(p)
    drain(scheduler)
    return forks, scheduler


def test_held_sequences_give_up_their_blocks_before_a_fork_that_needs_them_fails():
    forks, scheduler = run_forks(4)
    ample, _ = run_forks(64)
    assert [f.stop_reason for f in forks] == [f.stop_reason for f in ample]
    assert "error" not in [f.stop_reason for f in forks]
    assert [f.token_ids for f in forks] == [f.token_ids for f in ample]
    assert scheduler.preemptions >= 1 and scheduler.pool.num_used == 0
