"""Approximate prefill (ASKS): a prompt reads another prompt's KV where their tokens agree, with a
similarity test before it and selective recompute after it (after CacheBlend).

A step with an ASKS plan (rksc.cache.donors) has one row: a prompt's tokens after its exact prefix.

1. Reuse: every planned position gets the donor's K and V, every layer, the keys rotated by the
   position shift (rotary embeddings compose: R(a) R(b) = R(a + b), so a key computed at position p
   and rotated by d is the key the same hidden state gives at p + d).
2. Test: the first `probe + 1` layers (Asks.probe, default 1) run over every token of the row; their
   KV is then exact, and layer `probe`'s fresh keys and values show how far each reused token's
   state is from the one its new context gives (layer 0's KV ignores the context: probe >= 1). The
   similarity is the sum of those cosines over the reused tokens divided by all tokens of the row
   (a token without a donor counts 0): 1 means every token reused and unchanged.
3. Below `tau`: the row is computed in full, exactly as without ASKS. Otherwise the tokens without
   a donor, the `recompute` fraction of reused tokens with the lowest cosine, and the last token are
   computed through every layer, over a context that mixes them with the reused KV; the others
   keep the reused KV from layer probe + 1 on (and the exact KV of the test below it).
"""

from __future__ import annotations

import math
import time

import torch

from rksc.cache.donors import Plan
from rksc.engine.paged_runner import PagedRunner
from rksc.engine.scheduler import Step
from rksc.engine.sequence import Asks
from rksc.errors import RkscError


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
    bs, table = runner.pool.block_size, row.seq.table
    slots = [b * bs + s for b, s in row.slots]
    positions = list(range(row.start, row.start + len(row.tokens)))
    matched = [i for i, s in enumerate(plan.sources) if s is not None]
    reuse(runner, rotary, [plan.sources[i] for i in matched], [slots[i] for i in matched],
          [plan.shifts[i] for i in matched])
    probe = min(asks.probe, runner.layers - 1)
    dst = torch.tensor([slots[i] for i in matched])
    before = _kv(runner, probe, dst)
    runner.row_forward(table, row.tokens, positions, slots, stop_after=probe)
    cosines = torch.nn.functional.cosine_similarity(before, _kv(runner, probe, dst), dim=1)
    similarity = float(cosines.sum()) / len(row.tokens)
    test_s = time.perf_counter() - t0
    report = {"tokens": len(row.tokens), "cached_tokens": row.start, "matched": len(matched),
              "similarity": round(similarity, 6), "tau": asks.tau, "test_s": test_s,
              "donor_tokens": plan.donor_tokens, "runs": len(plan.matches), "probe": probe}
    if similarity < asks.tau:
        logits = runner.row_forward(table, row.tokens, positions, slots)
        report.update(reused=False, recomputed=len(row.tokens), prefill_s=time.perf_counter() - t0)
        return logits[None], report
    worst = torch.argsort(cosines)[:math.ceil(asks.recompute * len(matched))].tolist()
    chosen = set(range(len(row.tokens))) - set(matched)
    chosen |= {matched[i] for i in worst} | {len(row.tokens) - 1}
    chosen = sorted(chosen)
    logits = runner.row_forward(table, [row.tokens[i] for i in chosen], [positions[i] for i in chosen],
                                [slots[i] for i in chosen])
    report.update(reused=True, recomputed=len(chosen), prefill_s=time.perf_counter() - t0)
    return logits[None], report


def _kv(runner: PagedRunner, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """[m, 2 * H * D] float32: the keys and values at `slots` of one layer, a row per slot."""
    k = runner.kv.k[layer].index_select(0, slots).flatten(1)
    v = runner.kv.v[layer].index_select(0, slots).flatten(1)
    return torch.cat([k, v], 1).float()
