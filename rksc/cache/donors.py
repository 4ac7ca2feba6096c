"""Donors for approximate KV reuse (ASKS): prompts whose exact KV is in the pool, and where a new
prompt's tokens can be read from them. Pure Python; the pool never touches a tensor.

The exact prefix index (rksc.cache.blocks) only serves a prompt's leading tokens when every token
before them is identical. `Donors` keeps the most recent exactly computed prompts with the blocks
that hold their KV, and `plan` aligns a new prompt against them (difflib's longest matching runs,
monotone, at any shift): every target position in a run of at least `min_run` identical tokens can
take the donor's KV, its keys rotated by the position shift. Whether it should is decided later,
with tensors (rksc.engine.blend). A donor position counts only while its block still holds the same
KV (`BlockPool.holds`: referenced, or cached in the prefix index, and not retaken since).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from difflib import SequenceMatcher

from rksc.cache.blocks import BlockPool, BlockTable

NGRAM = 4  # donors are shortlisted by shared token 4-grams before the alignment


@dataclass(frozen=True)
class Match:
    """A run of identical tokens: target positions [target, target + size) read the donor's KV at
    [donor, donor + size)."""

    donor: int
    target: int
    size: int

    @property
    def shift(self) -> int:
        return self.target - self.donor


@dataclass(frozen=True)
class Plan:
    """Where the prompt's tokens from `start` on (the exact prefix index serves those before) can be
    read: `sources[i]` is the donor slot for target position start + i, or None."""

    start: int
    sources: list[int | None]
    shifts: list[int]  # per target position from start: target - donor position (0 where no source)
    matches: list[Match]
    donor_tokens: int  # length of the donor prompt
    epochs: dict[int, int]  # donor block -> its epoch when planned

    @property
    def matched(self) -> int:
        return sum(s is not None for s in self.sources)


@dataclass
class _Donor:
    ids: tuple[int, ...]
    blocks: list[int]
    epochs: list[int]
    grams: frozenset


def _grams(ids) -> frozenset:
    return frozenset(tuple(ids[i:i + NGRAM]) for i in range(len(ids) - NGRAM + 1))


class Donors:
    """The `capacity` most recently registered prompts with exact KV."""

    def __init__(self, pool: BlockPool, capacity: int = 32, shortlist: int = 2):
        self.pool, self.capacity, self.shortlist = pool, capacity, shortlist
        self._donors: OrderedDict[tuple[int, ...], _Donor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._donors)

    def add(self, ids, table: BlockTable) -> None:
        """Register a prompt whose KV was computed exactly and is in `table`'s blocks."""
        ids = tuple(ids)
        if not ids or table.num_tokens < len(ids):
            return
        bs = self.pool.block_size
        blocks = table.blocks[:-(-len(ids) // bs)]
        self._donors.pop(ids, None)
        self._donors[ids] = _Donor(ids, list(blocks), [self.pool.blocks[b].epoch for b in blocks], _grams(ids))
        while len(self._donors) > self.capacity:
            self._donors.popitem(last=False)

    def clear(self) -> None:
        self._donors.clear()

    def _valid(self, donor: _Donor) -> list[bool]:
        """Per donor position: does its block still hold the KV written for it?"""
        bs, ok = self.pool.block_size, [self.pool.holds(b, e) for b, e in zip(donor.blocks, donor.epochs)]
        return [ok[p // bs] for p in range(len(donor.ids))]

    def plan(self, ids, start: int, min_run: int = 8) -> Plan | None:
        """The best single-donor plan for positions [start, len(ids) - 1) of prompt `ids` (the last
        token is always computed: its logits are wanted), or None when no donor covers `min_run`
        tokens there."""
        target = list(ids)
        stop = len(target) - 1
        if stop - start < min_run:
            return None
        want = _grams(target[start:stop])
        ranked = sorted(((len(want & d.grams), i, d) for i, d in enumerate(self._donors.values())),
                        key=lambda x: (-x[0], -x[1]))
        best: Plan | None = None
        for overlap, _, donor in ranked[:self.shortlist]:
            if overlap == 0:
                break
            valid = self._valid(donor)
            if not any(valid):
                self._donors.pop(donor.ids, None)
                continue
            # a position whose KV is gone matches nothing: a sentinel no target token equals
            source = [t if ok else -1 - p for p, (t, ok) in enumerate(zip(donor.ids, valid))]
            matcher = SequenceMatcher(None, source, target[start:stop], autojunk=False)
            matches = [Match(a, start + b, n) for a, b, n in matcher.get_matching_blocks() if n >= min_run]
            covered = sum(m.size for m in matches)
            if covered >= min_run and (best is None or covered > best.matched):
                best = self._plan(donor, start, len(target), matches)
        return best

    def _plan(self, donor: _Donor, start: int, length: int, matches: list[Match]) -> Plan:
        bs = self.pool.block_size
        sources: list[int | None] = [None] * (length - start)
        shifts = [0] * (length - start)
        for m in matches:
            for k in range(m.size):
                p = m.donor + k
                sources[m.target + k - start] = donor.blocks[p // bs] * bs + p % bs
                shifts[m.target + k - start] = m.shift
        used = {s // bs for s in sources if s is not None}
        epochs = {b: e for b, e in zip(donor.blocks, donor.epochs) if b in used}
        return Plan(start, sources, shifts, matches, len(donor.ids), epochs)

    def still_valid(self, plan: Plan) -> Plan:
        """The plan without the sources whose block was retaken since it was made (e.g. evicted by
        the allocation that made room for the target)."""
        bs = self.pool.block_size
        gone = {b for b, e in plan.epochs.items() if not self.pool.holds(b, e)}
        if not gone:
            return plan
        sources = [None if s is not None and s // bs in gone else s for s in plan.sources]
        return Plan(plan.start, sources, plan.shifts, plan.matches, plan.donor_tokens, plan.epochs)
