"""Batched decoding of branches that share one prefix, written as a generator.

`decode` yields one `Column` per step (the token each live row chose); consumers can stop early,
stream, or prune by simply not asking for the next column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rksc.engine.dense import Batch, DenseRunner
from rksc.engine.sampler import Sampler


@dataclass
class Column:
    step: int
    tokens: list[int]  # one per row
    probs: list[float]  # model probability of each chosen token
    live: list[bool]  # rows that had not finished before this step (their token counts)
    ended: list[bool]  # rows whose token this step is an end-of-sequence token


@dataclass
class Trace:
    """What one branch generated."""

    token_ids: list[int] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)
    finished: bool = False  # ended with an end-of-sequence token

    @property
    def confidence(self) -> float:
        """Mean model probability of the chosen tokens (the paper's generation confidence)."""
        return sum(self.token_probs) / len(self.token_probs) if self.token_probs else 0.0


def decode(runner: DenseRunner, batch: Batch, logits: torch.Tensor, sampler: Sampler,
           max_new_tokens: int, eos_ids: set[int]) -> Iterator[Column]:
    live = [True] * batch.rows
    for step in range(max_new_tokens):
        tokens, probs = sampler(logits)
        toks = tokens.tolist()
        ended = [ok and t in eos_ids for ok, t in zip(live, toks)]
        yield Column(step, toks, probs.tolist(), list(live), ended)
        live = [ok and not e for ok, e in zip(live, ended)]
        if not any(live) or step == max_new_tokens - 1:
            return
        logits = runner.step(batch, tokens)


def collect(columns: Iterator[Column], rows: int) -> list[Trace]:
    traces = [Trace() for _ in range(rows)]
    for col in columns:
        for i, trace in enumerate(traces):
            if col.live[i]:
                trace.token_ids.append(col.tokens[i])
                trace.token_probs.append(col.probs[i])
                trace.finished = col.ended[i]
    return traces
