"""The engine interface: everything a program (rksc.engine.driver) may ask of a model.

`Engine` implements it on the local block pool, `OpenAIBackend` (rksc.engine.remote) over an
OpenAI-compatible server. Programs use nothing else, so either runs every program unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rksc.engine.sequence import Sequence


@dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # tokens computed by decode steps
    prefill_tokens: int = 0  # prompt tokens computed by prefill steps (those read from the prefix index excluded)
    sampled: int = 0  # tokens generated (sampled after a prompt or a decode step)
    failed_steps: int = 0  # steps whose forward pass or sampling raised: their sequences ended with the error
    prefill_s: float = 0.0
    decode_s: float = 0.0
    rows_hist: dict[int, int] = field(default_factory=dict)  # decode rows per step -> steps
    lens_steps: int = 0  # prefill steps that ended prompts with a layer exit
    lens_layers: int = 0  # decoder layers those steps ran
    exit_layers_saved: int = 0  # decoder layers they skipped: every row had exited
    asks_steps: int = 0  # approximate prefills tried (a donor was found)
    asks_reused: int = 0  # of those, the ones whose similarity passed tau
    asks_tokens: int = 0  # prompt tokens in those steps
    asks_computed: int = 0  # tokens those steps computed through every layer
    asks_test_s: float = 0.0  # time spent on reuse and the similarity test


@runtime_checkable
class EngineAPI(Protocol):
    stats: EngineStats

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it runs in later steps. Raises RkscError for what this engine cannot run."""

    def cancel(self, seq: Sequence) -> None:
        """End a sequence now (waiting, running or held) and free its KV."""

    def release(self, seq: Sequence) -> None:
        """Free a held sequence's KV once every waiting child has forked it."""

    @property
    def has_work(self) -> bool:
        """Some sequence is waiting or running."""

    def step(self) -> list[Sequence]:
        """Advance the sequences; returns those that gained a token or finished."""

    def kv_bytes(self, seqs: Iterable[Sequence]) -> int | None:
        """Bytes of KV the sequences hold together (shared blocks once); None: not held here."""

    def block_bytes(self) -> int | None:
        """Bytes of one KV block; None: the KV is not held here."""

    def drop_cached(self) -> int:
        """Forget cached prefixes (blocks no sequence holds); returns how many were dropped."""

    def close(self) -> None:
        """Stop what the engine runs in the background."""
