"""Paged KV block pool bookkeeping (RSBCM): which block holds which tokens, who references it, what a
later sequence can reuse and what may be evicted. Pure Python; the pool never touches a tensor.

Contract with the tensor owner, who keeps K and V per layer shaped [num_blocks, block_size, heads, dim]:
  * write positions are (block_id, slot) pairs, one per new token in order; write those tokens' K and V
    there before the next `allocate_sequence` (full blocks are indexed at once and may be reused);
  * a `Copy` from `append` is done first (slots [0, num_tokens) of src into dst, every layer, K and V);
  * `allocate_sequence` says how many leading tokens are already cached (read from shared blocks, not
    recomputed); never the last token, so the caller always runs one token and gets its logits.
Every block is exactly one of: free (ref 0, no hash, on the free list), cached (ref 0, in the prefix
index, evictable) or referenced (ref > 0, never evicted). Calls that need blocks are atomic: when the
pool cannot supply them they raise PoolExhausted and change nothing.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rksc.errors import RkscError

if TYPE_CHECKING:
    from rksc.cache.policies import Policy

Slot = tuple[int, int]  # (block_id, slot within the block)


class PoolExhausted(RkscError):
    """Every block is referenced by a live sequence: nothing is left to allocate or evict."""


@dataclass
class Block:
    id: int
    ref_count: int = 0
    token_ids: list[int] = field(default_factory=list)  # at most block_size
    hash: int | None = None  # chained hash of (parent hash, token_ids); set only while in the prefix index
    parent: int | None = None  # while in the index: the hash of the block before it in its chain
    twin: tuple[int, int] | None = None  # a full block not indexed because an equal one is: (its id, epoch)
    depth: int = 0  # tree depth of the branch that wrote it; 0 for a shared problem prefix
    attention: float = 0.0  # attention mass its tokens received while in use
    last_used: int = 0  # logical clock tick
    position: int = 0  # its index in the table that wrote it: a chain's later blocks have larger positions
    epoch: int = 0  # times the block was taken from the free list: a changed epoch means other KV


@dataclass
class BlockTable:
    """One sequence's view of the pool: its KV lives in `blocks`, in order, `block_size` tokens each."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    depth: int = 0  # given to the blocks this sequence writes

    def slot(self, position: int, block_size: int) -> Slot:
        assert 0 <= position < self.num_tokens, (position, self.num_tokens)
        return self.blocks[position // block_size], position % block_size


@dataclass(frozen=True)
class Copy:
    """Copy-on-write instruction: copy slots [0, num_tokens) of block src into block dst."""

    src: int
    dst: int
    num_tokens: int


@dataclass
class PoolStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix index
    hit_tokens: int = 0
    queried_blocks: int = 0  # full prompt blocks eligible for a hit
    hit_blocks: int = 0
    evictions: int = 0
    cut: int = 0  # evictions of a block that other indexed blocks extend: those can no longer be hit
    copies: int = 0


def _chain(parent: int | None, token_ids: Sequence[int]) -> int:
    return hash((parent, tuple(token_ids)))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    """Owns `num_blocks` blocks of `block_size` token slots; evicts cached blocks in `policy` order."""

    def __init__(self, num_blocks: int, block_size: int, policy: Policy):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks, self.block_size, self.policy = num_blocks, block_size, policy
        self.blocks = [Block(i) for i in range(num_blocks)]  # read-only outside the pool
        self.stats = PoolStats()
        self.clock = 0  # logical time: advanced by every call that uses blocks; read-only outside
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: set[int] = set()
        # eviction order: a heap of (policy key, block id) taken when a block became cached. A
        # block's key only grows (attention mass and recency only increase), so an entry whose key
        # went stale is pushed again with its current key, and the heap top is always the true
        # minimum; entries of blocks that left the cache are skipped. O(log n) instead of a scan.
        self._heap: list[tuple[tuple, int]] = []
        self._index: dict[int, int] = {}  # chained hash -> block id
        self._children: Counter[int] = Counter()  # chained hash -> indexed blocks whose parent it is

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones it may evict."""
        return self.num_free + self.num_cached

    def bytes_held(self, bytes_per_block: int) -> int:
        """Bytes of KV the pool keeps: blocks referenced by live sequences plus evictable cached ones."""
        return (self.num_used + self.num_cached) * bytes_per_block

    def holds(self, block_id: int, epoch: int) -> bool:
        """Whether the block still holds the KV it held at `epoch` (referenced or cached since)."""
        b = self.blocks[block_id]
        return b.epoch == epoch and (b.ref_count > 0 or block_id in self._cached)

    def cached_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens `allocate_sequence(token_ids)` would take from the prefix index
        (read-only: nothing is counted, reserved or touched)."""
        return len(self._hits(token_ids)) * self.block_size

    def allocation_cost(self, token_ids: Sequence[int]) -> int:
        """Blocks `allocate_sequence(token_ids)` would take from the free or evictable ones."""
        hits = self._hits(token_ids)
        return _ceil_div(len(token_ids), self.block_size) - len(hits) + sum(
            self.blocks[b].ref_count == 0 for b in hits)

    def append_cost(self, table: BlockTable, num_tokens: int, fork: bool = False) -> int:
        """Blocks `append(table, num_tokens tokens)` would take (a copy-on-write copy included); with
        `fork`, blocks that appending to a new fork of the table would take."""
        if num_tokens == 0:
            return 0
        partial = table.num_tokens % self.block_size
        cow = bool(partial) and (fork or self.blocks[table.blocks[-1]].ref_count > 1)
        return int(cow) + _ceil_div(table.num_tokens + num_tokens, self.block_size) - len(table.blocks)

    def _hits(self, token_ids: Sequence[int]) -> list[int]:
        bs, hits, parent = self.block_size, [], None
        for i in range(max(len(token_ids) - 1, 0) // bs):
            chunk = list(token_ids[i * bs:(i + 1) * bs])
            parent = _chain(parent, chunk)
            bid = self._index.get(parent)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
        return hits

    def allocate_sequence(self, token_ids: Sequence[int],
                          depth: int = 0) -> tuple[BlockTable, int, list[Slot]]:
        """Table for a new sequence; returns it, the number of leading tokens already cached, and the
        write positions of the remaining tokens."""
        bs = self.block_size
        eligible = max(len(token_ids) - 1, 0) // bs
        hits = self._hits(token_ids)
        self._ensure(_ceil_div(len(token_ids), bs) - len(hits), reserved=hits)
        self.clock += 1
        s = self.stats
        s.queried_tokens += len(token_ids)
        s.hit_tokens += len(hits) * bs
        s.queried_blocks += eligible
        s.hit_blocks += len(hits)
        for bid in hits:
            self._cached.discard(bid)
            self.blocks[bid].ref_count += 1
            self._use(bid)
        table = BlockTable(list(hits), len(hits) * bs, depth)
        return table, table.num_tokens, self._fill(table, token_ids[table.num_tokens:])

    def fork(self, table: BlockTable, depth: int) -> BlockTable:
        """A new table sharing every block of `table` (no KV is copied); ref counts go up by one."""
        self.clock += 1
        for bid in table.blocks:
            assert self.blocks[bid].ref_count > 0, f"fork of a freed table (block {bid})"
            self.blocks[bid].ref_count += 1
            self._use(bid)
        return BlockTable(list(table.blocks), table.num_tokens, depth)

    def append(self, table: BlockTable, token_ids: Sequence[int]) -> tuple[list[Slot], Copy | None]:
        """Reserve slots for `token_ids` after the table's tokens; returns the write positions and, when the
        last block was partially filled and shared, the copy that gives this table its own copy of it."""
        if not token_ids:
            return [], None
        bs, partial = self.block_size, table.num_tokens % self.block_size
        last = self.blocks[table.blocks[-1]] if partial else None
        cow = last is not None and last.ref_count > 1
        self._ensure(int(cow) + _ceil_div(table.num_tokens + len(token_ids), bs) - len(table.blocks))
        self.clock += 1
        copy = None
        if cow:
            dst = self.blocks[self._take(table.depth, len(table.blocks) - 1)]
            dst.token_ids = list(last.token_ids)
            last.ref_count -= 1
            table.blocks[-1] = dst.id
            copy = Copy(last.id, dst.id, partial)
            self.stats.copies += 1
        return self._fill(table, token_ids), copy

    def free(self, table: BlockTable) -> None:
        """Release the table's references and empty it; registered blocks stay cached until evicted."""
        for bid in reversed(table.blocks):
            b = self.blocks[bid]
            assert b.ref_count > 0, f"block {bid} released more often than referenced"
            b.ref_count -= 1
            if b.ref_count == 0 and b.hash is None:
                self._wipe(b)
                self._free.append(bid)
            elif b.ref_count == 0:
                self._cached.add(bid)
                self._push(bid)
        table.blocks, table.num_tokens = [], 0

    def invalidate(self, block_ids: Iterable[int]) -> None:
        """Drop referenced blocks from the prefix index: their KV is incomplete (a forward that failed,
        or stopped before its last layer). They stay with their tables and are freed like any other."""
        for bid in block_ids:
            b = self.blocks[bid]
            assert b.ref_count > 0, f"invalidated block {bid} is not referenced"
            if b.hash is not None:
                self._unindex(b)

    def evict(self) -> int | None:
        """Evict one cached block by policy onto the free list; its id, or None when nothing is evictable."""
        if not self._cached:
            return None
        bid = self._evict_one()
        self._free.append(bid)
        return bid

    def record_attention(self, block_id: int, mass: float) -> None:
        assert mass >= 0.0, mass
        assert self.blocks[block_id].ref_count > 0, f"attention recorded on unreferenced block {block_id}"
        self.blocks[block_id].attention += mass

    def touch(self, block_ids: Iterable[int]) -> None:
        self.clock += 1
        for bid in block_ids:
            self._use(bid)

    def _use(self, bid: int) -> None:
        """Mark a block used now, and the indexed block equal to it: the blocks after it in its table
        are indexed as that one's successors, and it must not leave before them."""
        b = self.blocks[bid]
        b.last_used = self.clock
        if b.twin is not None:
            twin = self.blocks[b.twin[0]]
            if twin.epoch == b.twin[1] and twin.hash is not None:
                twin.last_used = self.clock

    def _push(self, bid: int) -> None:
        heapq.heappush(self._heap, (self.policy.key(self.blocks[bid]), bid))
        if len(self._heap) > 4 * len(self._cached) + 1024:  # drop entries of blocks that left the cache
            self._heap = [(self.policy.key(self.blocks[i]), i) for i in self._cached]
            heapq.heapify(self._heap)

    def _ensure(self, need: int, reserved: Sequence[int] = ()) -> None:
        available = self.num_free + len(self._cached) - sum(1 for bid in set(reserved) if bid in self._cached)
        if need > available:
            raise PoolExhausted(
                f"KV block pool exhausted: need {need} blocks, {available} free or evictable; "
                f"{self.num_blocks - available} of {self.num_blocks} are held by live sequences. "
                "Raise --kv-budget, or lower --branches or --max-new-tokens.")

    def _take(self, depth: int, position: int) -> int:
        bid = self._free.popleft() if self._free else self._evict_one()
        b = self.blocks[bid]
        assert b.ref_count == 0 and b.hash is None and not b.token_ids, b
        b.ref_count, b.depth, b.attention, b.last_used, b.position = 1, depth, 0.0, self.clock, position
        b.epoch += 1
        return bid

    def _evict_one(self) -> int:
        while True:
            key, bid = heapq.heappop(self._heap)
            if bid not in self._cached:
                continue
            current = self.policy.key(self.blocks[bid])
            if current == key:
                break
            heapq.heappush(self._heap, (current, bid))
        b = self.blocks[bid]
        assert b.ref_count == 0 and b.hash is not None, b
        self._cached.remove(bid)
        self.stats.cut += self._children[b.hash] > 0
        self._unindex(b)
        self._wipe(b)
        self.stats.evictions += 1
        return bid

    def _unindex(self, b: Block) -> None:
        del self._index[b.hash]
        if b.parent is not None:
            self._children[b.parent] -= 1
            if not self._children[b.parent]:
                del self._children[b.parent]
        b.hash = b.parent = None

    def _wipe(self, b: Block) -> None:
        b.token_ids, b.hash, b.attention, b.twin = [], None, 0.0, None

    def _fill(self, table: BlockTable, token_ids: Sequence[int]) -> list[Slot]:
        for bid in table.blocks:  # a table is used as a whole: a block is never older than its successors
            self._use(bid)
        bs = self.block_size
        fills = table.num_tokens % bs + len(token_ids) >= bs
        parent = self._prefix_hash(table.blocks[:table.num_tokens // bs]) if fills else None
        positions = []
        for t in token_ids:
            if table.num_tokens % bs == 0:
                table.blocks.append(self._take(table.depth, len(table.blocks)))
            b = self.blocks[table.blocks[-1]]
            positions.append((b.id, len(b.token_ids)))
            b.token_ids.append(t)
            b.last_used = self.clock
            table.num_tokens += 1
            if len(b.token_ids) == bs:
                parent = self._register(b, parent)
        return positions

    def _register(self, b: Block, parent: int | None) -> int:
        h = _chain(parent, b.token_ids)
        if h in self._index:  # an equal block already indexed keeps the entry; this one stays private
            twin = self.blocks[self._index[h]]
            b.twin, twin.last_used = (twin.id, twin.epoch), self.clock
        else:
            self._index[h], b.hash, b.parent = b.id, h, parent
            if parent is not None:
                self._children[parent] += 1
        return h

    def _prefix_hash(self, block_ids: Sequence[int]) -> int | None:
        h = None
        for bid in block_ids:
            b = self.blocks[bid]
            h = b.hash if b.hash is not None else _chain(h, b.token_ids)
        return h

    def check(self, tables: Iterable[BlockTable] | None = None) -> None:
        """Assert every invariant; with `tables` (all live tables) also that ref counts match them exactly."""
        bs, free = self.block_size, set(self._free)
        assert [b.id for b in self.blocks] == list(range(self.num_blocks)), "blocks added or lost"
        assert len(free) == len(self._free), "block on the free list twice"
        for b in self.blocks:
            assert b.ref_count >= 0 and len(b.token_ids) <= bs, b
            assert (b.id in free) + (b.id in self._cached) + (b.ref_count > 0) == 1, b
            if b.id in free:
                assert b.hash is None and not b.token_ids, b
            if b.id in self._cached:
                assert b.hash is not None, b
            if b.hash is not None:
                assert self._index.get(b.hash) == b.id and len(b.token_ids) == bs, b
        assert all(self.blocks[bid].hash == h for h, bid in self._index.items())
        assert self._children == Counter(self.blocks[bid].parent for bid in self._index.values()
                                         if self.blocks[bid].parent is not None), "child counts off"
        lowest: dict[int, tuple] = {}
        for key, bid in self._heap:
            lowest[bid] = min(key, lowest.get(bid, key))
        assert all(bid in lowest and lowest[bid] <= self.policy.key(self.blocks[bid]) for bid in self._cached), \
            "a cached block is missing from the eviction heap"
        if tables is None:
            return
        refs: Counter[int] = Counter()
        for t in tables:
            assert len(t.blocks) == _ceil_div(t.num_tokens, bs), t
            for i, bid in enumerate(t.blocks):
                assert len(self.blocks[bid].token_ids) == min(bs, t.num_tokens - i * bs), (t, self.blocks[bid])
                assert self.blocks[bid].position == i, (t, self.blocks[bid])
            refs.update(t.blocks)
        assert all(b.ref_count == refs[b.id] for b in self.blocks), "ref counts differ from live tables"
