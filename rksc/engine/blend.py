"""Approximate prefill (ASKS): a prompt reads another prompt's KV where their tokens agree, with a
similarity test before it and selective recompute after it (after CacheBlend).

A step with an ASKS plan (rksc.cache.donors) has one row: a prompt's tokens after its exact prefix.

1. Reuse: every planned position gets the donor's K and V, every layer, the keys rotated by the
   position shift (rotary embeddings compose: R(a) R(b) = R(a + b), so a key computed at position p
   and rotated by d is the key the same hidden state gives at p + d).
2. Test: the row goes through the model in one pass. Layers 0..`probe` (Asks.probe, default 1) run
   over every token, so their KV is exact, and layer `probe`'s fresh keys and values show how far
   each reused token's state is from the one its new context gives (layer 0's KV ignores the
   context: probe >= 1). The similarity is the sum of those cosines over the reused tokens divided
   by all tokens of the row (a token without a donor counts 0): 1 means every token reused and
   unchanged.
3. Below `tau`: the pass goes on over every token, exactly a prefill without ASKS (the reused KV is
   overwritten layer by layer). Otherwise the row narrows, as CacheBlend's gradual filtering does:
   at layer `probe` and each of the next REFINE layers the reused tokens still in the row are ranked
   by how far their fresh KV deviates from the reused KV, relative to its size, and only the most
   deviating go on (2 x `recompute` of the reused tokens after the first of these layers, down to
   `recompute` after the last); tokens without a donor and the last token always go on. Each token
   that leaves keeps its exact KV below the layer it left at and the reused KV above.
"""

from __future__ import annotations

import math
import time

import torch

from rksc.cache.donors import Plan
from rksc.engine.paged import Forward, QueryRow
from rksc.engine.paged_runner import PagedRunner
from rksc.engine.scheduler import Step
from rksc.engine.sequence import Asks
from rksc.errors import RkscError

REFINE = 3  # layers after the probe at which the recompute set narrows (CacheBlend's gradual filtering)


class Rotary:
    """Rotates cached keys to other positions with the model's own rotary embedding."""

    def __init__(self, model):
        cfg = model.config.get_text_config()
        inner = model.get_decoder()
        self.rotary = getattr(inner, "rotary_emb", None)
        if self.rotary is None or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            raise RkscError(f"ASKS needs a model with rotary embeddings over the whole head "
                            f"({type(model).__name__} has none that it supports)")
        types = getattr(cfg, "layer_types", None)
        self.per_type = isinstance(getattr(self.rotary, "rope_type", None), dict)  # e.g. Gemma 3: local, global
        self.layer_types = list(types) if self.per_type and types else [None] * cfg.num_hidden_layers

    def angles(self, shifts: torch.Tensor) -> dict:
        """cos, sin [m, 1, D] (no attention scaling) for each layer type."""
        out = {}
        x = torch.zeros(1, dtype=torch.float32)
        for kind in set(self.layer_types):
            args = (x, shifts[None]) + ((kind,) if self.per_type else ())
            cos, sin = self.rotary(*args)
            scale = torch.sqrt(cos[..., :1] ** 2 + sin[..., :1] ** 2)  # the embedding's attention scaling
            out[kind] = ((cos / scale)[0, :, None, :].float(), (sin / scale)[0, :, None, :].float())
        return out

    @staticmethod
    def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys [m, H, D] rotated by the angles of their shifts."""
        k = keys.float()
        half = k.shape[-1] // 2
        turned = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return (k * cos + turned * sin).to(keys.dtype)


def reuse(runner: PagedRunner, rotary: Rotary, sources: list[int], targets: list[int], shifts: list[int]) -> None:
    """Copy the KV of pool slots `sources` into `targets`, keys rotated by `shifts`, every layer."""
    src, dst = torch.tensor(sources), torch.tensor(targets)
    angles = rotary.angles(torch.tensor(shifts))
    for layer, (k, v) in enumerate(zip(runner.kv.k, runner.kv.v)):
        cos, sin = angles[rotary.layer_types[layer]]
        k.index_copy_(0, dst, rotary.rotate(k.index_select(0, src), cos, sin))
        v.index_copy_(0, dst, v.index_select(0, src))


@torch.inference_mode()
def prefill(runner: PagedRunner, rotary: Rotary, step: Step, plan: Plan, asks: Asks) -> tuple[torch.Tensor, dict]:
    """Run an ASKS step; the next-token logits [1, V] after its row and a report of what it did."""
    t0 = time.perf_counter()
    (row,) = step.rows
    for c in step.copies:
        runner.kv.copy(c)
    bs = runner.pool.block_size
    slots = [b * bs + s for b, s in row.slots]
    positions = list(range(row.start, row.start + len(row.tokens)))
    matched = [i for i, s in enumerate(plan.sources) if s is not None]
    reuse(runner, rotary, [plan.sources[i] for i in matched], [slots[i] for i in matched],
          [plan.shifts[i] for i in matched])
    blend = Blend(runner, row.tokens, slots, matched, asks, t0)
    logits = runner.row_forward(row.seq.table, row.tokens, positions, slots, blend.before_layer)
    blend.finish()
    report = {"tokens": len(row.tokens), "cached_tokens": row.start, "matched": len(matched),
              "similarity": round(blend.similarity, 6), "tau": asks.tau, "test_s": blend.test_s,
              "donor_tokens": plan.donor_tokens, "runs": len(plan.matches), "probe": blend.probe,
              "cuts": blend.cuts, "reused": blend.reused, "recomputed": len(blend.live),
              "prefill_s": time.perf_counter() - t0}
    return logits[None], report


class Blend:
    """One ASKS row's way through the model, deciding before each layer which of its tokens go on.

    The reused KV of the layers in `cuts` (probe, probe + 1, ..., at most REFINE more) is kept aside
    before the forward; a layer writes each token's fresh KV over it. Before layer probe + 1 the
    similarity test reads layer `probe` (the row is then computed in full when it is below tau); at
    every cut the reused tokens still in the row are ranked by how far their fresh KV moved from the
    reused one, relative to its size, and the least moved leave the row: from 2 * recompute of the
    reused tokens at the first cut down to `recompute` at the last. A token that leaves keeps the
    KV it has (fresh below the cut, reused above). Tokens without a donor and the last token stay."""

    def __init__(self, runner: PagedRunner, tokens: list[int], slots: list[int], matched: list[int],
                 asks: Asks, t0: float):
        self.runner, self.asks = runner, asks
        self.n = len(tokens)
        self.probe = min(asks.probe, runner.layers - 1)
        self.cuts = list(range(self.probe, min(self.probe + REFINE, runner.layers - 2) + 1))
        self.matched = matched
        self.slots = torch.tensor(slots)
        dst = self.slots[matched]
        self.reused_kv = {layer: _kv(runner, layer, dst) for layer in self.cuts or [self.probe]}
        self.live = list(range(self.n))  # row positions still computed
        self.similarity: float | None = None
        self.reused = False
        self.test_s = time.perf_counter() - t0  # what the test adds to a plain prefill: copies, KV set aside,
        # the cosines

    def _test(self) -> bool:
        """The similarity test on layer `probe`, every token computed so far; True: reuse."""
        t = time.perf_counter()
        fresh = _kv(self.runner, self.probe, self.slots[self.matched])
        cosines = torch.nn.functional.cosine_similarity(self.reused_kv[self.probe], fresh, dim=1)
        self.similarity = float(cosines.sum()) / self.n
        self.test_s += time.perf_counter() - t
        return self.similarity >= self.asks.tau

    def finish(self) -> None:
        if self.similarity is None:  # no layer after the probe: every token went through every layer
            self._test()

    def before_layer(self, index: int, fwd: Forward, args: tuple, kwargs: dict):
        layer = index - 1
        if layer == self.probe and self.cuts:
            self.reused = self._test()
        if not self.reused:
            return None
        if layer in self.cuts:
            args = (self._narrow(layer, fwd, args[0]),) + args[1:]
        return args, {k: _rows(v, self.live_index, self.n) if k != "attention_mask" else v for k, v in kwargs.items()}

    def _narrow(self, layer: int, fwd: Forward, hidden: torch.Tensor) -> torch.Tensor:
        """Keep the tokens that go on after `layer`; their hidden states [1, live, H]."""
        where = {p: i for i, p in enumerate(self.live)}
        candidates = [i for i, p in enumerate(self.matched) if p in where and p != self.n - 1]
        fresh = _kv(self.runner, layer, self.slots[[self.matched[i] for i in candidates]])
        reused = self.reused_kv[layer][candidates]
        deviation = (fresh - reused).norm(dim=1) / fresh.norm(dim=1).clamp_min(1e-12)
        stage = self.cuts.index(layer)
        last = len(self.cuts) - 1
        share = self.asks.recompute * (1 + (last - stage) / last if last else 1)
        count = min(len(candidates), math.ceil(share * len(self.matched)))
        kept = {self.matched[candidates[i]] for i in torch.argsort(deviation, descending=True)[:count].tolist()}
        unmatched = set(self.live) - {self.matched[i] for i in candidates}
        self.live = sorted(unmatched | kept)
        self.live_index = torch.tensor(self.live)  # narrows every later layer's position arguments
        index = torch.tensor([where[p] for p in self.live])
        row = fwd.rows[0]
        fwd.write = fwd.write[index]
        fwd.rows = [QueryRow(0, len(self.live), row.table, row.positions[index], row.block_size)]
        return hidden[:, index]


def _rows(value, live: torch.Tensor, n: int):
    """A layer argument narrowed to the live tokens: tensors [1, n, ...] (positions, rotary angles)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == n:
        return value[:, live]
    if isinstance(value, tuple):
        return tuple(_rows(v, live, n) for v in value)
    return value


def _kv(runner: PagedRunner, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """[m, 2 * H * D] float32: the keys and values at `slots` of one layer, a row per slot."""
    k = runner.kv.k[layer].index_select(0, slots).flatten(1)
    v = runner.kv.v[layer].index_select(0, slots).flatten(1)
    return torch.cat([k, v], 1).float()
