from dataclasses import asdict, astuple

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rksc.cache import (POLICIES, BlockPool, Copy, LRUPolicy, PoolExhausted, RKSCPolicy, blocks_for_budget,
                        bytes_per_block)
from rksc.errors import RkscError


def snapshot(pool, tables=()):
    return ([astuple(b) for b in pool.blocks], asdict(pool.stats), pool.clock, pool.num_free, pool.num_cached,
            [(list(t.blocks), t.num_tokens, t.depth) for t in tables])


def test_sizes():
    size = bytes_per_block(num_layers=2, num_kv_heads=3, head_dim=4, block_size=16, dtype_bytes=2)
    assert size == 2 * 2 * 3 * 4 * 16 * 2  # K and V
    assert blocks_for_budget(1000, 300) == 3
    with pytest.raises(RkscError, match="smaller than one block"):
        blocks_for_budget(100, 300)


def test_allocate_gives_write_positions_in_token_order():
    pool = BlockPool(4, 4, LRUPolicy())
    table, cached, pos = pool.allocate_sequence([1, 2, 3, 4, 5, 6], depth=0)
    assert cached == 0 and table.num_tokens == 6 and len(table.blocks) == 2
    assert pos == [table.slot(i, 4) for i in range(6)] and pos[4] == (table.blocks[1], 0)
    assert pool.num_used == 2 and pool.num_free == 2
    pool.check([table])


def test_prefix_hit_reuses_block_ids_and_counts_hits():
    pool = BlockPool(8, 4, LRUPolicy())
    a, _, _ = pool.allocate_sequence(list(range(10)))
    b, cached, pos = pool.allocate_sequence(list(range(8)) + [99, 98, 97])
    assert cached == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert pos == [(b.blocks[2], 0), (b.blocks[2], 1), (b.blocks[2], 2)]
    assert pool.blocks[a.blocks[0]].ref_count == 2
    assert (pool.stats.hit_tokens, pool.stats.hit_blocks, pool.stats.queried_tokens) == (8, 2, 21)
    shared = a.blocks[:2]
    pool.free(a)
    pool.free(b)
    assert pool.num_cached == 2 and pool.num_used == 0  # the two full shared blocks stay cached
    c, cached, _ = pool.allocate_sequence(list(range(9)))
    assert cached == 8 and c.blocks[:2] == shared and pool.num_cached == 0
    d, cached, _ = pool.allocate_sequence([0, 1, 2, 7, 4])  # differs inside block 0: no hit
    assert cached == 0 and d.blocks[0] not in shared
    pool.check([c, d])


def test_a_hit_never_covers_the_last_token():
    pool = BlockPool(8, 4, LRUPolicy())
    a, _, _ = pool.allocate_sequence(list(range(8)))
    b, cached, pos = pool.allocate_sequence(list(range(8)))
    assert cached == 4 and b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1] and len(pos) == 4
    pool.check([a, b])


def test_fork_shares_blocks_and_copy_on_write_only_for_shared_partial_block():
    pool = BlockPool(8, 4, LRUPolicy())
    parent, _, _ = pool.allocate_sequence([1, 2, 3, 4, 5])
    child = pool.fork(parent, depth=1)
    assert child.blocks == parent.blocks and pool.blocks[parent.blocks[1]].ref_count == 2
    pos, copy = pool.append(child, [6])
    assert copy == Copy(src=parent.blocks[1], dst=child.blocks[1], num_tokens=1)
    assert pos == [(child.blocks[1], 1)] and pool.blocks[child.blocks[1]].depth == 1
    pos, copy = pool.append(parent, [7])  # no longer shared: written in place
    assert copy is None and pos == [(parent.blocks[1], 1)]
    pool.check([parent, child])


def test_no_copy_when_the_shared_last_block_is_full():
    pool = BlockPool(8, 2, LRUPolicy())
    parent, _, _ = pool.allocate_sequence([1, 2])
    child = pool.fork(parent, depth=1)
    pos, copy = pool.append(child, [3, 4, 5])
    assert copy is None and child.blocks[0] == parent.blocks[0] and len(child.blocks) == 3
    assert pos == [(child.blocks[1], 0), (child.blocks[1], 1), (child.blocks[2], 0)]
    pool.check([parent, child])


def test_free_caches_registered_blocks_and_frees_the_rest():
    pool = BlockPool(4, 2, LRUPolicy())
    t, _, _ = pool.allocate_sequence([1, 2, 3])
    pool.free(t)
    assert (pool.num_cached, pool.num_free, t.blocks, t.num_tokens) == (1, 3, [], 0)
    pool.check([])


def test_lru_evicts_least_recently_used_cached_block():
    pool = BlockPool(3, 1, LRUPolicy())
    t, _, _ = pool.allocate_sequence([1, 2, 3])
    ids = list(t.blocks)
    pool.free(t)
    pool.touch([ids[0], ids[2]])
    assert pool.evict() == ids[1]
    assert pool.evict() in (ids[0], ids[2]) and pool.evict() is not None and pool.evict() is None
    assert pool.stats.evictions == 3


def test_rksc_evicts_lowest_attention_per_depth_first_then_least_recently_used():
    pool = BlockPool(8, 1, RKSCPolicy())
    specs = [(0, 0, 1.0), (1, 3, 2.0), (2, 1, 0.75), (3, 1, 0.75)]  # priorities 1.0, 0.5, 0.375, 0.375
    tables = [pool.allocate_sequence([i, 9], depth=d)[0] for i, d, _ in specs]
    for t, (_, _, mass) in zip(tables, specs):
        pool.record_attention(t.blocks[0], mass)
    firsts = [t.blocks[0] for t in tables]
    pool.touch([firsts[3]])
    pool.touch([firsts[2]])  # equal priority: firsts[3] was used longer ago
    for t in tables:
        pool.free(t)
    order = [pool.evict() for _ in range(8)]
    assert set(order[:4]).isdisjoint(firsts)  # the unattended second blocks go first
    assert order[4:] == [firsts[3], firsts[2], firsts[1], firsts[0]]
    assert pool.evict() is None and pool.num_free == 8


@pytest.mark.parametrize("policy", ["leaf", "lru"])
def test_leaf_evicts_a_chain_from_its_end_so_its_prefix_stays_reachable(policy):
    pool = BlockPool(8, 2, POLICIES[policy])
    tokens = list(range(1, 10))  # 5 blocks, 4 of them full and indexed
    table, _, _ = pool.allocate_sequence(tokens)
    assert [pool.blocks[b].position for b in table.blocks] == [0, 1, 2, 3, 4]
    pool.free(table)
    reachable = []
    for _ in range(4):
        pool.evict()
        reachable.append(pool.cached_prefix(tokens) // 2)
    if policy == "leaf":
        assert reachable == [3, 2, 1, 0] and pool.stats.cut == 0  # every cached block still serves a hit
    else:  # equal recency, ties by block id: the chain's first block goes first and strands the rest
        assert reachable == [0, 0, 0, 0] and pool.stats.cut == 3


def test_a_table_is_used_as_a_whole_so_leaf_takes_the_block_appended_last_first():
    pool = BlockPool(4, 1, POLICIES["leaf"])
    table, _, _ = pool.allocate_sequence([5])
    pool.append(table, [6])  # a prefill chunk: no decode step touches the table after it
    pool.append(table, [7])
    blocks = list(table.blocks)
    pool.free(table)
    assert [pool.evict() for _ in range(3)] == blocks[::-1] and pool.stats.cut == 0


def test_exhaustion_leaves_state_unchanged_and_referenced_blocks_are_kept():
    pool = BlockPool(3, 2, LRUPolicy())
    a, _, _ = pool.allocate_sequence([1, 2, 3])
    b = pool.fork(a, depth=1)
    before = snapshot(pool, [a, b])
    with pytest.raises(PoolExhausted, match="exhausted"):
        pool.allocate_sequence([5, 6, 7, 8, 9])
    with pytest.raises(PoolExhausted):
        pool.append(b, [4, 5, 6])  # copy-on-write + one more block: two needed, one free
    assert snapshot(pool, [a, b]) == before
    pool.check([a, b])
    assert isinstance(PoolExhausted("x"), RkscError)


SPEC_KEYS = {  # the eviction orders the policies must produce, restated independently of rksc.cache.policies
    "lru": lambda b: (b.last_used,),
    "rksc": lambda b: (b.attention / (b.depth + 1), b.last_used),
    "leaf": lambda b: (b.last_used, -b.position),
}


class PoolMachine(RuleBasedStateMachine):
    """Drives a small pool against a fake KV store: kv[(block, slot)] = the token prefix that slot encodes."""

    def __init__(self):
        super().__init__()
        self.pool = None
        self.tables, self.tokens, self.kv = [], [], {}
        self.seen = [[]]  # every sequence so far: new prompts often extend one, to produce prefix hits

    @initialize(policy=st.sampled_from(sorted(POLICIES)), num_blocks=st.integers(1, 12),
                block_size=st.integers(1, 3))
    def init(self, policy, num_blocks, block_size):
        self.pool = BlockPool(num_blocks, block_size, POLICIES[policy])
        self.spec_key = SPEC_KEYS[policy]

    def cached_keys(self):
        return {b.id: self.spec_key(b) for b in self.pool.blocks if b.ref_count == 0 and b.hash is not None}

    def check_evictions(self, keys, evictions_before, kept=()):
        evicted = set(keys) - set(self.cached_keys()) - set(kept)
        assert len(evicted) == self.pool.stats.evictions - evictions_before  # only unreferenced cached blocks
        rest = set(keys) - evicted - set(kept)
        if evicted and rest:
            assert max(keys[e] for e in evicted) <= min(keys[r] for r in rest)

    def write(self, table, tokens, positions, first):
        for i, p in enumerate(positions):
            assert p == table.slot(first + i, self.pool.block_size)
            self.kv[p] = tuple(tokens[:first + i + 1])

    @rule(base=st.integers(0, 99), keep=st.integers(0, 8), extra=st.lists(st.integers(0, 2), max_size=5),
          depth=st.integers(0, 3))
    def allocate(self, base, keep, extra, depth):
        pool, bs = self.pool, self.pool.block_size
        tokens = self.seen[base % len(self.seen)][:keep] + extra
        self.seen.append(tokens)
        before, keys, ev = snapshot(pool, self.tables), self.cached_keys(), pool.stats.evictions
        indexed = {b.id for b in pool.blocks if b.hash is not None}
        try:
            table, cached, pos = pool.allocate_sequence(tokens, depth)
        except PoolExhausted:
            event("allocate: exhausted")
            assert snapshot(pool, self.tables) == before
            assert -(-len(tokens) // bs) > pool.num_free + pool.num_cached
            return
        k = cached // bs
        assert cached % bs == 0 and (cached < len(tokens) or cached == 0) and len(pos) == len(tokens) - cached
        assert pool.stats.hit_tokens - before[1]["hit_tokens"] == cached
        if (k + 1) * bs < len(tokens):  # the longest cached prefix was taken: block k was not indexed
            assert all(self.kv.get((bid, bs - 1)) != tuple(tokens[:(k + 1) * bs]) for bid in indexed)
        self.check_evictions(keys, ev, kept=table.blocks[:k])
        event(f"allocate: {'hit' if k else 'miss'}, {'evicted' if pool.stats.evictions > ev else 'no eviction'}")
        self.write(table, tokens, pos, cached)
        self.tables.append(table)
        self.tokens.append(list(tokens))

    @rule(i=st.integers(0, 99), depth=st.integers(0, 3))
    def fork(self, i, depth):
        if not self.tables:
            return
        i %= len(self.tables)
        child = self.pool.fork(self.tables[i], depth)
        assert child.blocks == self.tables[i].blocks and child.blocks is not self.tables[i].blocks
        self.tables.append(child)
        self.tokens.append(list(self.tokens[i]))

    @rule(i=st.integers(0, 99), depth=st.integers(0, 3), new=st.lists(st.integers(0, 2), min_size=1, max_size=3),
          write_child=st.booleans())
    def branch(self, i, depth, new, write_child):
        """Fork, then decode into the child or the parent: the copy-on-write path."""
        self.fork(i, depth)
        if self.tables:
            self.append(len(self.tables) - 1 if write_child else i % (len(self.tables) - 1), new)

    @rule(i=st.integers(0, 99), new=st.lists(st.integers(0, 2), max_size=4))
    def append(self, i, new):
        if not self.tables:
            return
        pool, bs = self.pool, self.pool.block_size
        table = self.tables[i % len(self.tables)]
        tokens = self.tokens[i % len(self.tables)]
        old_blocks, n, partial = list(table.blocks), table.num_tokens, table.num_tokens % bs
        shared = bool(new) and partial > 0 and pool.blocks[old_blocks[-1]].ref_count > 1
        before, keys, ev = snapshot(pool, self.tables), self.cached_keys(), pool.stats.evictions
        try:
            pos, copy = pool.append(table, new)
        except PoolExhausted:
            event("append: exhausted")
            assert snapshot(pool, self.tables) == before
            assert shared + -(-(n + len(new)) // bs) - len(old_blocks) > pool.num_free + pool.num_cached
            return
        assert (copy is not None) == shared  # copy-on-write exactly for a shared partially filled block
        event(f"append: {'copy-on-write' if shared else 'in place'}")
        if copy is not None:
            assert copy == Copy(old_blocks[-1], table.blocks[len(old_blocks) - 1], partial)
            assert copy.dst not in old_blocks
            for s in range(copy.num_tokens):
                self.kv[(copy.dst, s)] = self.kv[(copy.src, s)]
        else:
            assert table.blocks[:len(old_blocks)] == old_blocks
        self.check_evictions(keys, ev)
        tokens.extend(new)
        self.seen.append(list(tokens))
        self.write(table, tokens, pos, n)

    @rule(i=st.integers(0, 99))
    def free(self, i):
        if not self.tables:
            return
        i %= len(self.tables)
        table = self.tables.pop(i)
        self.tokens.pop(i)
        self.pool.free(table)
        assert table.blocks == [] and table.num_tokens == 0

    @rule()
    def evict(self):
        keys = self.cached_keys()
        bid = self.pool.evict()
        if bid is None:
            assert not keys
        else:
            assert keys[bid] == min(keys.values()) and self.pool.blocks[bid].hash is None

    @rule(i=st.integers(0, 99), masses=st.lists(st.floats(0, 4), min_size=1, max_size=3))
    def attend(self, i, masses):
        if not self.tables:
            return
        for j, bid in enumerate(self.tables[i % len(self.tables)].blocks):
            self.pool.record_attention(bid, masses[j % len(masses)])

    @rule(i=st.integers(0, 99))
    def touch(self, i):
        if not self.tables:
            return
        self.pool.touch(self.tables[i % len(self.tables)].blocks)

    @invariant()
    def consistent(self):
        if self.pool is None:
            return
        pool = self.pool
        pool.check(self.tables)
        assert pool.num_used + pool.num_cached + pool.num_free == pool.num_blocks
        for table, tokens in zip(self.tables, self.tokens):  # every live sequence reads back its own KV
            assert table.num_tokens == len(tokens)
            for p in range(len(tokens)):
                assert self.kv[table.slot(p, pool.block_size)] == tuple(tokens[:p + 1])


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_pool_machine = PoolMachine.TestCase


def test_exhausted_pool_says_which_flags_to_change():
    pool = BlockPool(2, 2, LRUPolicy())
    with pytest.raises(PoolExhausted) as err:
        pool.allocate_sequence([1, 2, 3, 4, 5])
    message = str(err.value)  # a CLI user cannot "free finished branches": name the flags instead
    assert "--kv-budget" in message and "--branches" in message and "--max-new-tokens" in message
    assert "Free finished" not in message
