"""The `naive` condition: what a user writes with plain transformers.

`model.generate` over the B full prompts (left-padded, one batch: every branch prefills the whole
problem again), then one forward over the B full verification prompts (each reads the problem
again). Same prompts, same selection as the solver; only the computation differs.
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rksc.engine.baselines import Generation, Verification
from rksc.engine.decode import Trace
from rksc.engine.sampler import Sampling
from rksc.engine.verifier import Verifier


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _cache_bytes(out) -> int:
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) if cache else 0


class _FirstStep(StoppingCriteria):
    """Records when generate finished the prompt and its first token (the end of prefill)."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class HFGenerateBaseline:
    name = "naive"

    def __init__(self, model, verifier: Verifier, eos: set[int], pad_id: int):
        self.model, self.verifier, self.eos, self.pad_id = model, verifier, eos, pad_id

    @torch.inference_mode()
    def generate(self, prefix: list[int], suffixes: list[list[int]], max_new_tokens: int,
                 sampling: Sampling) -> Generation:
        ids, mask = left_pad([prefix + s for s in suffixes], self.pad_id)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not sampling.greedy,
                                  temperature=sampling.temperature or None, top_p=sampling.top_p,
                                  eos_token_id=sorted(self.eos), pad_token_id=self.pad_id,
                                  return_dict_in_generate=True, output_logits=True)
        first = _FirstStep()
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
        t = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([first]))
        end = time.perf_counter()
        new = out.sequences[:, ids.shape[1]:]
        probs = torch.stack([torch.softmax(lg.float(), -1) for lg in out.logits], dim=1)  # [B, T, V]
        chosen = probs.gather(2, new[:, :, None])[:, :, 0]
        traces = []
        for row, row_probs in zip(new.tolist(), chosen.tolist()):
            trace = Trace()
            for tok, p in zip(row, row_probs):
                trace.token_ids.append(tok)
                trace.token_probs.append(p)
                if tok in self.eos:
                    trace.finished = True
                    break
            traces.append(trace)
        held = _cache_bytes(out)
        prefill_end = first.at or end
        return Generation(traces, prefill_end - t, end - prefill_end, {"decode_peak": held})

    def finish(self) -> None:
        """Nothing held between calls."""

    @torch.inference_mode()
    def verify(self, prefix: list[int], suffixes: list[list[int]]) -> Verification:
        t = time.perf_counter()
        ids, mask = left_pad([prefix + s for s in suffixes], self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                         use_cache=True)
        held = _cache_bytes(out)
        return Verification(self.verifier.score_logits(out.logits[:, -1].float()), time.perf_counter() - t, held)
