"""`PagedRunner`: runs the model over the paged block pool (the engine's forward) and owns its KV tensors.

`run(step)` takes a scheduled step (rows of new tokens, each with its block table and write
slots), packs every row's tokens into one sequence [1, N] with no padding, and returns next-token
logits for the rows that want them. Decode steps use cascade attention: the rows are split into
segments by their common blocks (one problem's branches share its prefix; a tree's children
share their parent's path), each segment is read once for all of its rows, each row's remaining
blocks are read in one padded batch, and the parts are merged exactly by log-sum-exp. A prefill
step may come with a `LayerWatch` (rksc.engine.lens): then the logit lens follows its finishing
rows through the layers, and the forward ends early once they have all exited.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from rksc.cache import DEFAULT_POLICY, POLICIES, BlockPool, BlockTable, blocks_for_budget, bytes_per_block
from rksc.engine import paged
from rksc.engine.lens import AllExited, LayerWatch, watching
from rksc.engine.paged import ATTENTION, Forward, PagedKV, QueryRow, Segment, attention
from rksc.engine.scheduler import Step


@contextmanager
def before_each(layers, on_layer, fwd: Forward):
    """Call `on_layer(index, fwd, args, kwargs)` before every layer; what it returns replaces the layer's
    (args, kwargs) (None keeps them). The hooks go in every case."""
    def hook(index: int):
        return lambda module, args, kwargs: on_layer(index, fwd, args, kwargs)

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PagedRunner:
    def __init__(self, model, pool: BlockPool, kv: PagedKV):
        self.model, self.pool, self.kv = model, pool, kv
        cfg = model.config.get_text_config()
        self.layers = cfg.num_hidden_layers
        self.decoder_layers = model.get_decoder().layers[:self.layers]
        self.block_bytes = bytes_per_block(self.layers, kv.k[0].shape[1], kv.k[0].shape[2], pool.block_size,
                                           kv.k[0].element_size())

    @classmethod
    def create(cls, model, budget_bytes: int, block_size: int = 16, policy: str = DEFAULT_POLICY) -> PagedRunner:
        cfg = model.config.get_text_config()
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        per_block = bytes_per_block(cfg.num_hidden_layers, heads, head_dim, block_size,
                                    torch.tensor([], dtype=dtype).element_size())
        blocks = blocks_for_budget(budget_bytes, per_block)
        kv = PagedKV(cfg.num_hidden_layers, blocks, block_size, heads, head_dim, dtype)
        return cls(model, BlockPool(blocks, block_size, POLICIES[policy]), kv)

    def kv_bytes(self, tables: list[BlockTable]) -> int:
        """Bytes of the distinct blocks the tables reference: shared blocks count once (None: no blocks,
        e.g. a held sequence that gave its blocks up)."""
        return len({b for t in tables if t is not None for b in t.blocks}) * self.block_bytes

    @torch.inference_mode()
    def run(self, step: Step, watch: LayerWatch | None = None) -> torch.Tensor | None:
        """Logits [R, V] float32 for the rows of `step` whose `last` is set, in row order; None when
        `watch` ended the forward before its last layer (the later layers' KV is not written)."""
        for c in step.copies:
            self.kv.copy(c)
        bs = self.pool.block_size
        ids, write, pos, metas, keep = [], [], [], [], []
        for r in step.rows:
            q0 = len(ids)
            ids += r.tokens
            write += [b * bs + s for b, s in r.slots]
            pos += range(r.start, r.start + len(r.tokens))
            metas.append(QueryRow(q0, len(ids), r.seq.table, torch.arange(r.start, r.start + len(r.tokens)), bs))
            if r.last:
                keep.append(len(ids) - 1)
        fwd = Forward(self.kv, torch.tensor(write), metas)
        tables = [r.seq.table for r in step.rows]
        if step.decode:
            self._decode_layout(fwd, tables, [r.start for r in step.rows])
        if not keep:  # a chunk in the middle of a prompt: KV only
            keep = [len(ids) - 1]
        keep = torch.tensor(keep)
        hooks = watching(self.decoder_layers, watch, keep) if watch is not None else nullcontext()
        try:
            with attention(self.model, ATTENTION), hooks:
                out = self.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=False,
                                 logits_to_keep=keep, rksc=fwd)
        except AllExited:
            return None
        if step.decode:
            self._record(fwd, tables)
        logits = out.logits[0].float()  # [len(keep), V]
        return logits if any(r.last for r in step.rows) else logits[:0]

    @torch.inference_mode()
    def row_forward(self, table: BlockTable, ids: list[int], positions: list[int], slots: list[int],
                    on_layer=None) -> torch.Tensor:
        """One row of prompt tokens at increasing, not necessarily contiguous, `positions`, written to
        pool `slots`, each attending to the table's slots at positions up to its own; the next-token
        logits [V] after its last token. `on_layer(index, fwd, args, kwargs)` runs before every layer
        and may narrow the row (rksc.engine.blend), as long as its last token stays last."""
        fwd = Forward(self.kv, torch.tensor(slots), [QueryRow(0, len(ids), table, torch.tensor(positions),
                                                         self.pool.block_size)])
        hooks = before_each(self.decoder_layers, on_layer, fwd) if on_layer is not None else nullcontext()
        with attention(self.model, ATTENTION), hooks:
            out = self.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                             use_cache=False, logits_to_keep=1, rksc=fwd)
        return out.logits[0, -1].float()

    def _decode_layout(self, fwd: Forward, tables: list[BlockTable], starts: list[int]) -> None:
        """How a decode step reads the pool: each row's block table for the compiled kernel, or else the
        cascade's shared runs of blocks."""
        bs = self.pool.block_size
        if paged.kernel.supports(self.kv.k[0]):  # the kernel reads each row's own table
            width = max(len(t.blocks) for t in tables)
            fwd.tables = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.int32)
            fwd.lengths = torch.tensor([t.num_tokens for t in tables], dtype=torch.int32)
            fwd.record_layer = self.layers - 1
            return
        # only full blocks that hold no row's new token can be shared
        full = [t.blocks[:s // bs] for t, s in zip(tables, starts)]
        own_first = [0] * len(tables)  # first own block of each row
        segments: list[tuple[int, int, list[int]]] = []  # (first block index, stop, rows)
        stack = [(list(range(len(tables))), 0)]
        while stack:
            rows, i = stack.pop()
            # rows share blocks [0, i); extend the run while every row has the same next block
            j, first = i, full[rows[0]]
            while all(len(full[r]) > j and full[r][j] == first[j] for r in rows):
                j += 1
            if j > i and len(rows) > 1:
                segments.append((i, j, rows))
            elif len(rows) == 1:
                own_first[rows[0]] = i
                continue
            parts: dict[int, list[int]] = {}
            for r in rows:
                if len(full[r]) > j:
                    parts.setdefault(full[r][j], []).append(r)
                else:
                    own_first[r] = j
            for part in parts.values():
                if len(part) > 1:
                    stack.append((part, j))
                else:
                    own_first[part[0]] = j
        everyone = len(tables)
        for i, j, rows in sorted(segments, key=lambda s: (s[0], s[2])):
            rows = sorted(rows)
            run = full[rows[0]][i:j]
            slots = (torch.tensor(run)[:, None] * bs + torch.arange(bs)[None, :]).flatten()
            contiguous = run == list(range(run[0], run[0] + len(run)))  # then a view instead of a gather
            if len(rows) == everyone:
                who = None
            elif rows == list(range(rows[0], rows[0] + len(rows))):  # a problem's rows are admitted together
                who = slice(rows[0], rows[0] + len(rows))
            else:
                who = torch.tensor(rows)
            fwd.segments.append(Segment(slice(int(slots[0]), int(slots[-1]) + 1) if contiguous else slots, who,
                                        i * bs))
        # each row's own part: from its first own block to its last token, padded to the longest
        own_blocks = [t.blocks[f:] for t, f in zip(tables, own_first)]
        width = max(len(b) for b in own_blocks)
        padded = torch.tensor([b + [0] * (width - len(b)) for b in own_blocks])  # [B, W]
        own = (padded[:, :, None] * bs + torch.arange(bs)).reshape(len(tables), width * bs)
        own_len = torch.tensor([t.num_tokens - f * bs for t, f in zip(tables, own_first)])
        valid = torch.arange(width * bs)[None, :] < own_len[:, None]
        # padding reads the row's first own slot: unwritten slots may hold NaN, which a mask cannot hide
        fwd.own = torch.where(valid, own, own[:, :1])
        zero, ninf = torch.zeros((), dtype=self.kv.k[0].dtype), torch.tensor(float("-inf"), dtype=self.kv.k[0].dtype)
        fwd.own_bias = torch.where(valid, zero, ninf)[:, None, None, :]
        fwd.own_start = torch.tensor(own_first) * bs
        fwd.q_pos = torch.tensor(starts)
        fwd.record_layer = self.layers - 1

    def _record(self, fwd: Forward, tables: list[BlockTable]) -> None:
        """Feed the eviction policies: attention mass per block (last layer) and recency."""
        if fwd.block_mass is not None:  # the kernel's
            per_block = fwd.block_mass
        elif fwd.attention_mass is None:  # e.g. the last layer is a sliding-window layer
            return
        else:
            per_block = self._cascade_mass(fwd)
        blocks = per_block.nonzero().flatten()
        for block, mass in zip(blocks.tolist(), per_block[blocks].tolist()):
            self.pool.record_attention(block, mass)
        self.pool.touch({b for t in tables for b in t.blocks})

    def _cascade_mass(self, fwd: Forward) -> torch.Tensor:
        shared_mass, own_mass = fwd.attention_mass
        bs = self.pool.block_size
        per_block = torch.zeros(self.pool.num_blocks, dtype=torch.float32)
        for seg, mass in zip(fwd.segments, shared_mass):
            slots = seg.slots if isinstance(seg.slots, torch.Tensor) else torch.arange(seg.slots.start, seg.slots.stop)
            per_block.index_add_(0, slots // bs, mass)
        valid = torch.isfinite(fwd.own_bias[:, 0, 0, :]).flatten()
        per_block.index_add_(0, (fwd.own // bs).flatten()[valid], own_mass.flatten()[valid])
        return per_block
