"""`PoolRunner`: the Runner interface (prefill / extend / step) over the paged block pool.

A prefix is a block table; `extend` forks it once per row without copying (ref counts only), so
B branches hold the prefix KV once and add only their own blocks. Finished work is released with
`release`: blocks return to the pool, full ones stay in the prefix index (evictable) so a later
request with the same tokens reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rksc.cache import POLICIES, BlockPool, BlockTable, blocks_for_budget, bytes_per_block
from rksc.engine.paged import ATTENTION, Forward, PagedKV, Row, attention, slot_ids


@dataclass
class PoolPrefix:
    ids: list[int]
    table: BlockTable
    last_logits: torch.Tensor | None
    cached_tokens: int  # tokens whose KV came from the prefix index instead of being computed
    block_bytes: int

    @property
    def nbytes(self) -> int:
        return len(self.table.blocks) * self.block_bytes


@dataclass
class PoolBatch:
    tables: list[BlockTable]
    block_bytes: int

    @property
    def rows(self) -> int:
        return len(self.tables)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the distinct blocks the rows reference: shared blocks count once."""
        return len({b for t in self.tables for b in t.blocks}) * self.block_bytes


class PoolRunner:
    def __init__(self, model, pool: BlockPool, kv: PagedKV, pad_id: int = 0):
        self.model, self.pool, self.kv, self.pad_id = model, pool, kv, pad_id
        cfg = model.config.get_text_config()
        self.layers = cfg.num_hidden_layers
        self.block_bytes = bytes_per_block(self.layers, kv.k[0].shape[1], kv.k[0].shape[2], pool.block_size,
                                           kv.k[0].element_size())

    @classmethod
    def create(cls, model, budget_bytes: int, block_size: int = 16, policy: str = "rksc",
               pad_id: int = 0) -> PoolRunner:
        cfg = model.config.get_text_config()
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        per_block = bytes_per_block(cfg.num_hidden_layers, heads, head_dim, block_size,
                                    torch.tensor([], dtype=dtype).element_size())
        blocks = blocks_for_budget(budget_bytes, per_block)
        kv = PagedKV(cfg.num_hidden_layers, blocks, block_size, heads, head_dim, dtype)
        return cls(model, BlockPool(blocks, block_size, POLICIES[policy]), kv, pad_id)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> PoolPrefix:
        return self.prefill_many([ids])[0]

    @torch.inference_mode()
    def prefill_many(self, sequences: list[list[int]], depth: int = 0) -> list[PoolPrefix]:
        """New sequences in one packed forward; leading blocks found in the prefix index are
        reused, so only each sequence's uncached tail is computed."""
        rows = []
        try:
            for ids in sequences:
                table, cached, positions = self.pool.allocate_sequence(ids, depth=depth)
                rows.append((table, cached, ids[cached:], positions))
        except Exception:
            for table, *_ in rows:
                self.pool.free(table)
            raise
        logits = self._forward(rows, decode=False)
        return [PoolPrefix(list(ids), table, lg, cached, self.block_bytes)
                for ids, (table, cached, _, _), lg in zip(sequences, rows, logits)]

    @torch.inference_mode()
    def extend(self, prefix: PoolPrefix | list[PoolPrefix], suffixes: list[list[int]],
               depth: int = 1) -> tuple[PoolBatch, torch.Tensor]:
        """One row per suffix, forked from `prefix` (or from its own prefix when given a list);
        returns the batch and next-token logits [B, V]."""
        assert suffixes and all(suffixes), "every suffix needs at least one token"
        parents = prefix if isinstance(prefix, list) else [prefix] * len(suffixes)
        rows, tables = [], []
        try:
            for parent, s in zip(parents, suffixes, strict=True):
                tables.append(self.pool.fork(parent.table, depth))
                rows.append((tables[-1], tables[-1].num_tokens, s, self._append(tables[-1], s)))
        except Exception:
            for table in tables:  # the request fails as a whole; other sequences are untouched
                self.pool.free(table)
            raise
        return PoolBatch([r[0] for r in rows], self.block_bytes), self._forward(rows, decode=False)

    @torch.inference_mode()
    def step(self, batch: PoolBatch, tokens: torch.Tensor) -> torch.Tensor:
        rows = []
        for table, tok in zip(batch.tables, tokens.tolist()):
            rows.append((table, table.num_tokens, [tok], self._append(table, [tok])))
        return self._forward(rows, decode=True)

    def fork(self, batch: PoolBatch, row: int, depth: int) -> PoolPrefix:
        """A new prefix holding row `row`'s whole sequence (copy-free), for trees of thoughts."""
        table = self.pool.fork(batch.tables[row], depth)
        return PoolPrefix([], table, None, 0, self.block_bytes)

    def drop_cached(self) -> int:
        """Evict every cached (unreferenced) block: the next request starts with a cold index."""
        dropped = 0
        while self.pool.evict() is not None:
            dropped += 1
        return dropped

    def release(self, item: PoolBatch | PoolPrefix) -> None:
        for table in item.tables if isinstance(item, PoolBatch) else [item.table]:
            self.pool.free(table)

    def _append(self, table: BlockTable, tokens: list[int]) -> list[tuple[int, int]]:
        positions, copy = self.pool.append(table, tokens)
        if copy is not None:
            self.kv.copy(copy)
        return positions

    def _forward(self, rows, decode: bool) -> torch.Tensor:
        bs = self.pool.block_size
        ids, write, pos, metas, last = [], [], [], [], []
        for table, start, toks, positions in rows:
            q0 = len(ids)
            ids += toks
            write += [b * bs + s for b, s in positions]
            pos += range(start, start + len(toks))
            metas.append(Row(q0, len(ids), table, torch.arange(start, start + len(toks)), bs))
            last.append(len(ids) - 1)
        fwd = Forward(self.kv, torch.tensor(write), metas)
        if decode:
            self._cascade_layout(fwd, [r[0] for r in rows], [r[1] for r in rows])
        with attention(self.model, ATTENTION):
            out = self.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=False,
                             logits_to_keep=torch.tensor(last), rksc=fwd)
        if decode:
            self._record(fwd, [r[0] for r in rows])
        return out.logits[0].float()  # [rows, V]

    def _cascade_layout(self, fwd: Forward, tables: list[BlockTable], starts: list[int]) -> None:
        bs = self.pool.block_size
        common = 0
        while all(len(t.blocks) > common and t.blocks[common] == tables[0].blocks[common] for t in tables):
            common += 1
        # shared: full blocks common to every row that hold no row's new token
        shared_tokens = min(common * bs, min(starts) // bs * bs) if len(tables) > 1 else 0
        if shared_tokens:
            slots = slot_ids(tables[0], 0, shared_tokens, bs)
            contiguous = slots[-1] - slots[0] == len(slots) - 1
            fwd.shared = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots)  # a view if it can
        own = [slot_ids(t, shared_tokens, t.num_tokens, bs) for t in tables]
        width = max(len(o) for o in own)
        fwd.own = torch.zeros((len(own), width), dtype=torch.long)
        fwd.own_bias = torch.full((len(own), 1, 1, width), float("-inf"), dtype=self.kv.k[0].dtype)
        for i, o in enumerate(own):
            fwd.own[i, :len(o)] = torch.tensor(o)
            fwd.own_bias[i, ..., :len(o)] = 0
        fwd.q_pos = torch.tensor(starts)
        fwd.shared_tokens = shared_tokens
        fwd.record_layer = self.layers - 1

    def _record(self, fwd: Forward, tables: list[BlockTable]) -> None:
        """Feed the eviction policies: attention mass per block (last layer) and recency."""
        if fwd.attention_mass is None:  # e.g. the last layer is a sliding-window layer
            return
        shared_mass, own_mass = fwd.attention_mass
        bs = self.pool.block_size
        per_block = torch.zeros(self.pool.num_blocks, dtype=torch.float32)
        if shared_mass is not None:
            shared = fwd.shared if isinstance(fwd.shared, torch.Tensor) else torch.arange(fwd.shared.start,
                                                                                         fwd.shared.stop)
            per_block.index_add_(0, shared // bs, shared_mass)
        per_block.index_add_(0, (fwd.own // bs).flatten(), own_mass.flatten())
        for block in per_block.nonzero().flatten().tolist():
            self.pool.record_attention(block, float(per_block[block]))
        self.pool.touch({b for t in tables for b in t.blocks})
