"""The one-problem-at-a-time baselines (`--cache shared|none`): prompts in, branch traces and
verifier scores out.

- `SharedBaseline`: the problem prefix is prefilled once; branches and verifications extend its KV.
- `NoKVBaseline`: the paper's No-KV baseline, every row prefills its whole prompt (still batched).

Both run on a `DenseRunner` (per-batch DynamicCache, the prefix copied into each row), one problem at
a time. The default path is the engine (rksc.engine.engine).

Both take token ids (a prefix and per-row suffixes) and time their own stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rksc.engine.decode import Trace, collect, decode
from rksc.engine.dense import Prefix
from rksc.engine.sampler import Sampler, Sampling
from rksc.engine.verifier import Verifier


@dataclass
class Generation:
    traces: list[Trace]
    prefill_s: float  # prompt processing
    decode_s: float  # token-by-token generation
    kv_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class Verification:
    scores: list[float]
    seconds: float
    kv_bytes: int


class SharedBaseline:
    def __init__(self, runner, verifier: Verifier, eos: set[int], name: str = "shared"):
        self.runner, self.verifier, self.eos, self.name = runner, verifier, eos, name
        self._prefix = None  # the prefix of the last generation, reused to verify it

    def _rows(self, prefix: list[int], suffixes: list[list[int]], fresh: bool):
        if fresh or self._prefix is None or self._prefix.ids != prefix:
            self.finish()
            self._prefix = self.runner.prefill(prefix)
        return self._prefix, suffixes

    def finish(self) -> None:
        """Release the held prefix (pool blocks stay in the prefix index for later requests)."""
        if self._prefix is not None:
            self.runner.release(self._prefix)
            self._prefix = None

    def generate(self, prefix: list[int], suffixes: list[list[int]], max_new_tokens: int,
                 sampling: Sampling) -> Generation:
        t = time.perf_counter()
        shared, rows = self._rows(prefix, suffixes, fresh=True)
        batch, logits = self.runner.extend(shared, rows)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        sampler = Sampler(sampling, len(rows))
        try:
            traces = collect(decode(self.runner, batch, logits, sampler, max_new_tokens, self.eos), len(rows))
            held = batch.kv_bytes
        finally:
            self.runner.release(batch)
        kv = {"prefix": shared.nbytes, "decode_peak": held}
        if getattr(shared, "cached_tokens", 0):
            kv["prefix_cached_tokens"] = shared.cached_tokens
        return Generation(traces, prefill_s, time.perf_counter() - t, kv)

    def verify(self, prefix: list[int], suffixes: list[list[int]]) -> Verification:
        t = time.perf_counter()
        shared, rows = self._rows(prefix, suffixes, fresh=False)
        scores, held = self.verifier.score(shared, rows)
        return Verification(scores, time.perf_counter() - t, held)


class NoKVBaseline(SharedBaseline):
    def _rows(self, prefix: list[int], suffixes: list[list[int]], fresh: bool):
        return Prefix.empty(), [prefix + s for s in suffixes]
