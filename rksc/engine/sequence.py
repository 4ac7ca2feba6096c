"""A sequence: one row of work the engine owns, from its prompt to its last token.

A sequence starts WAITING (no KV), becomes RUNNING when the scheduler admits it (its block table
holds every token whose KV is written), and ends FINISHED with a stop reason. A sequence with
`max_tokens=0` only runs its prompt: it ends as soon as its prompt's next-token logits exist
(a shared prefix to fork from, or a verifier question whose logits are read). With `hold`, a
finished sequence keeps its blocks until the program releases it, so children can fork it.
A prompt-only sequence with a `LayerExit` (a verifier question) may stop part-way through the
model once the logit lens is decisive; it then has a lens score instead of logits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from rksc.cache import BlockTable
from rksc.engine.sampler import Sampling

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# why a sequence ended
STOP_REASONS = ("finished", "length", "prefilled", "cancelled", "error")


@dataclass(frozen=True)
class LayerExit:
    """Stop the forward of a prompt's last chunk after the first layer at which the logit lens
    (rksc.engine.lens) margin has had |margin| >= threshold for `patience` consecutive layers, not
    before layer `min_layer` (the first layers' margins are large and say nothing on real models).
    threshold=inf never stops and records the margin after every layer (for calibration)."""

    threshold: float
    patience: int = 1
    min_layer: int = 0

    def __post_init__(self):
        if math.isnan(self.threshold) or self.threshold < 0:
            raise ValueError(f"layer exit threshold must be >= 0, not {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"layer exit patience must be >= 1, not {self.patience}")
        if self.min_layer < 0:
            raise ValueError(f"layer exit min_layer must be >= 0, not {self.min_layer}")


@dataclass(frozen=True)
class Asks:
    """Approximate KV reuse (ASKS) for this sequence's prompt: positions the exact prefix index does
    not serve may read the KV of an earlier prompt (rksc.cache.donors) when its similarity test
    passes `tau` (> 1: never); `recompute` is the fraction of reused tokens computed anyway (those
    whose KV deviates most); runs shorter than `min_run` tokens are not reused."""

    tau: float
    recompute: float = 0.15
    min_run: int = 8
    probe: int = 1  # the layer whose KV the similarity test compares (layers 0..probe run on every token)

    def __post_init__(self):
        if math.isnan(self.tau):
            raise ValueError("ASKS tau must be a number")
        if not 0.0 <= self.recompute <= 1.0:
            raise ValueError(f"ASKS recompute fraction must be in [0, 1], not {self.recompute}")
        if self.min_run < 1:
            raise ValueError(f"ASKS min_run must be >= 1, not {self.min_run}")
        if self.probe < 0:
            raise ValueError(f"ASKS probe layer must be >= 0, not {self.probe}")

    @property
    def enabled(self) -> bool:
        return self.tau <= 1.0


@dataclass(frozen=True)
class Options:
    """What a sequence asks of the engine besides its tokens."""

    branch: int = 0  # seeds its own sampling generator (seed, branch)
    keep_logits: bool = False  # keep the next-token logits after the prompt ([V] float32)
    confidence: bool = False  # record each generated token's confidence (sampler.CONFIDENCE_TOP_K)
    logprobs: int | None = None  # record each generated token's log-probability and the top `logprobs`
    layer_exit: LayerExit | None = None  # prompt-only, not held: its prompt's forward may stop early
    asks: Asks | None = None  # approximate reuse of other prompts' KV (and register this one as a donor)


@dataclass(frozen=True)
class LensRead:
    """What the logit lens read on a question's prompt (rksc.engine.lens): its verdict is `score`
    when `exit_layer` is set, else the one of its logits."""

    margins: list[float]  # the YES/NO margin after each layer run
    exit_layer: int | None  # the layer after which it could exit
    score: float | None  # sigmoid(margin after exit_layer)
    layers_skipped: int  # decoder layers its step did not run


@dataclass(eq=False, slots=True)
class Outputs:
    """What a sequence produced besides its tokens."""

    error: str | None = None  # why it ended with stop reason "error"
    logits: torch.Tensor | None = None  # with keep_logits; None if its forward stopped early
    token_probs: list[float] = field(default_factory=list)  # of each generated token
    token_confs: list[float] = field(default_factory=list)  # with `confidence`
    token_logprobs: list[float] = field(default_factory=list)  # with `logprobs` (at T=1)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with `logprobs`
    lens: LensRead | None = None  # with `layer_exit`
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not computed
    approximate: bool = False  # its KV (or a parent's) was reused approximately (ASKS)
    asks_report: dict | None = None  # what ASKS did with its prompt
    prefilled_at: float = 0.0  # perf_counter time its prompt was done


@dataclass(eq=False, slots=True)
class Bookkeeping:
    """What the scheduler and the engine keep on a sequence while it runs."""

    prefilled: bool = False  # next-token logits for all of `ids` were computed
    released: bool = False  # the owner no longer holds it
    pending_children: int = 0  # waiting sequences that will fork this one
    generator: Any = None  # torch.Generator when sampling
    last_step: int = -1  # the engine step that last gave it logits


@dataclass(eq=False, slots=True, init=False)
class Sequence:
    prompt_ids: list[int]
    max_tokens: int  # tokens to generate; 0: run the prompt only
    sampling: Sampling
    stop_ids: frozenset[int]
    parent: Sequence | None  # fork its KV (copy-free) instead of computing it; must hold its blocks
    depth: int  # given to the blocks it writes (eviction priority)
    hold: bool  # keep the blocks after finishing, until released
    options: Options
    id: int
    token_ids: list[int]
    status: Status
    stop_reason: str | None
    table: BlockTable | None
    out: Outputs
    book: Bookkeeping

    def __init__(self, prompt_ids: list[int], max_tokens: int = 0, sampling: Sampling | None = None,
                 branch: int = 0, stop_ids: frozenset[int] = frozenset(), parent: Sequence | None = None,
                 depth: int = 0, hold: bool = False, keep_logits: bool = False, confidence: bool = False,
                 logprobs: int | None = None, layer_exit: LayerExit | None = None, asks: Asks | None = None):
        """The keywords after `hold` make its `options`."""
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if logprobs is not None and logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        if layer_exit is not None and (max_tokens or hold):
            raise ValueError("a layer exit is for prompt-only sequences that are not held: "
                             "the KV of the layers it skips is never written")
        self.prompt_ids, self.max_tokens, self.sampling = prompt_ids, max_tokens, sampling or Sampling()
        self.stop_ids, self.parent, self.depth, self.hold = stop_ids, parent, depth, hold
        self.options = Options(branch, keep_logits, confidence, logprobs, layer_exit, asks)
        self.id, self.token_ids, self.status, self.stop_reason = next(_ids), [], Status.WAITING, None
        self.table, self.out, self.book = None, Outputs(), Bookkeeping()

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def num_computed(self) -> int:
        """Tokens whose KV is in the pool."""
        return self.table.num_tokens if self.table is not None else 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_token(self) -> bool:
        return len(self.token_ids) < self.max_tokens

    @property
    def decoding(self) -> bool:
        """Running, past its prompt: the next step feeds its last sampled token."""
        return self.status is Status.RUNNING and self.book.prefilled

