"""What a solve gives back: the chosen answer, every branch, timings and KV figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rksc.reasoning import answers
from rksc.reasoning.config import SolveConfig


@dataclass
class Branch:
    index: int
    hint: str
    prompt_text: str  # prefix + suffix, exactly as fed to the model
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    answer: str | None
    confidence: float
    verifier: float | None
    finished: bool
    depth: int = 1
    parent: int | None = None  # index of the parent node at depth - 1 (trees only)
    stop_reason: str | None = None  # finished (end of sequence), length (token cap), consensus, pruned,
    # probe-stable (early exit)
    token_confs: list[float] = field(default_factory=list)  # per-token confidence, when tracked
    token_probs: list[float] = field(default_factory=list)  # per-token probability, when tracked
    verifier_margins: list[float] = field(default_factory=list)  # logit-lens YES/NO margin after each layer
    verifier_exit_layer: int | None = None  # the layer its verifier question exited after (--early-stop layers)
    probes: list[tuple[int, int, str | None]] = field(default_factory=list)  # answers its probes read: (tokens
    # when the probe started, tokens when it was read, answer), with --early-stop probe or when recording probes

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Timing:
    prefill_s: float = 0.0  # prompt processing: the shared prefix once plus the branch suffixes
    decode_s: float = 0.0  # token-by-token generation
    verify_s: float = 0.0
    total_s: float = 0.0
    new_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class SolveResult:
    question: str
    answer: str | None
    chosen: int
    kind: str
    model: str
    config: SolveConfig
    prefix_tokens: int
    branches: list[Branch]
    timing: Timing
    kv_bytes: dict = field(default_factory=dict)  # prefix, peak held during decode / verify
    gold: str | None = None
    tree: list[dict] = field(default_factory=list)  # per depth: nodes and the kept indices
    early: dict | None = None  # early exit: policies, what fired, stop reasons, probes, KV freed

    @property
    def correct(self) -> bool | None:
        return None if self.gold is None else answers.same_answer(self.answer, self.gold)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["correct"] = self.correct
        d["timing"]["decode_tok_s"] = round(self.timing.decode_tok_s, 2)
        for b in d["branches"]:
            b["tokens"] = len(b["token_ids"])
        return d
