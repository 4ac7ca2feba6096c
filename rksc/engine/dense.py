"""`DenseRunner`: runs the model on a dense per-batch cache, for the one-problem-at-a-time baselines.

A `Prefix` is the KV of a token sequence computed once with batch 1. `DenseRunner.extend` starts a
batch of B rows from one prefix: it feeds each row its own suffix (left-padded to a common length,
pads masked out, positions kept contiguous per row) over the prefix KV, so the prefix is never
re-computed per branch. `DenseRunner.step` feeds one more token per row.

Layout of row i in the batch cache: [prefix (P) | pads (S_max - S_i) | suffix_i (S_i) | new tokens].
Position ids are logical (prefix 0..P-1, then P, P+1, ... for real tokens), so padding changes no
arithmetic that reaches a real token: masked slots get exactly zero attention weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class Prefix:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H_kv, P, D]
    last_logits: torch.Tensor | None  # [V] float32, next-token logits after the prefix

    @classmethod
    def empty(cls) -> Prefix:
        """No shared prefix: `extend` then processes every row's whole prompt (the No-KV baseline)."""
        return cls(ids=[], kv=[], last_logits=None)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass
class Batch:
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] bool, False for padding slots
    next_pos: torch.Tensor  # [B] position id of each row's next token
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = self.mask.shape[0]

    @property
    def kv_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


class DenseRunner:
    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Prefix:
        cache = DynamicCache()
        out = self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return Prefix(ids=list(ids), kv=kv, last_logits=out.logits[0, -1].float())

    @torch.inference_mode()
    def extend(self, prefix: Prefix, suffixes: list[list[int]]) -> tuple[Batch, torch.Tensor]:
        """Start one row per suffix from the shared prefix; returns the batch and logits [B, V]."""
        assert suffixes and all(len(s) > 0 for s in suffixes), "every suffix needs at least one token"
        rows, plen = len(suffixes), len(prefix.ids)
        smax = max(len(s) for s in suffixes)
        ids = torch.full((rows, smax), self.pad_id, dtype=torch.long)
        mask = torch.ones((rows, plen + smax), dtype=torch.bool)
        pos = torch.zeros((rows, smax), dtype=torch.long)
        for i, s in enumerate(suffixes):
            pad = smax - len(s)
            ids[i, pad:] = torch.tensor(s)
            mask[i, plen:plen + pad] = False
            pos[i, pad:] = torch.arange(plen, plen + len(s))
            pos[i, :pad] = plen  # pads: any position; they are masked as keys and their outputs unused
        # one copy of the prefix KV per row (the block pool removes this copy)
        shared = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix.kv]
        cache = DynamicCache(ddp_cache_data=shared or None)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True, logits_to_keep=1)
        next_pos = torch.tensor([plen + len(s) for s in suffixes])
        return Batch(cache=cache, mask=mask, next_pos=next_pos), out.logits[:, -1].float()

    def release(self, item: Batch | Prefix) -> None:
        """Nothing to do: DynamicCache tensors are freed when the last reference goes."""

    @torch.inference_mode()
    def step(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens: [B]); returns next-token logits [B, V] float32."""
        batch.mask = torch.cat([batch.mask, torch.ones((batch.rows, 1), dtype=torch.bool)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=batch.mask,
                         position_ids=batch.next_pos[:, None], cache=batch.cache, use_cache=True)
        batch.next_pos = batch.next_pos + 1
        return out.logits[:, -1].float()
