"""What a solve is asked to do: `SolveConfig`, checked as it is built (the CLI's flags map onto it)."""

from __future__ import annotations

from dataclasses import dataclass

from rksc import validate
from rksc.engine.sampler import Sampling
from rksc.errors import RkscError
from rksc.reasoning import early
from rksc.reasoning.select import METHODS


@dataclass(frozen=True)
class SolveConfig:
    branches: int = 8
    max_new_tokens: int = 512  # most GSM8K branches of the default model finish within it (docs/early-exit.md)
    select: str = "composite"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    hints: bool = True  # a distinct approach hint per branch
    verify: bool = True
    cache: str = "pool"  # pool: paged blocks, prefix held once; shared: prefix copied per row;
    # none: the No-KV baseline, every row prefills its whole prompt
    answer_format: str = "auto"
    depth: int = 1  # tree of thoughts: depth > 1 forks the best `keep` nodes at every depth
    keep: int = 2
    verifier: str = "auto"  # continue: ask on top of each branch's own KV (pool); prompt: the paper's
    # separate prompt (problem prefix + solution + question); auto: continue on the pool, else prompt
    early_stop: tuple[str, ...] = ()  # early-exit policies and gates (rksc.reasoning.early), or ("cgee",):
    # the model's calibrated combination
    thresholds: early.Thresholds | dict | None = None  # None: the model's calibration profile; a dict:
    # the profile's thresholds with these fields set by hand (early.check_thresholds); Thresholds: all by hand
    layout: str = "shared"  # shared: one problem prefix, hints after it; diverse: instruction first
    asks: str = "auto"  # on: prompts may reuse other prompts' KV approximately (rksc.engine.blend); auto: where
    # the model's calibration passed its answer guard (rksc asks-calibrate)
    asks_tau: float | None = None  # None: the model's ASKS calibration (rksc asks-calibrate --save)
    asks_recompute: float | None = None  # None: the calibration's, else 0.15

    def __post_init__(self):
        validate.integer("branches", self.branches, 1, validate.MAX_BRANCHES)
        validate.integer("max_new_tokens", self.max_new_tokens, 1)
        validate.choice("select", self.select, METHODS)
        validate.number("temperature", self.temperature, minimum=0)
        validate.number("top_p", self.top_p, above=0, maximum=1)
        validate.integer("seed", self.seed, 0, validate.MAX_SEED)
        validate.boolean("hints", self.hints)
        validate.boolean("verify", self.verify)
        validate.choice("cache", self.cache, validate.CACHES)
        validate.choice("answer_format", self.answer_format, validate.ANSWER_FORMATS)
        validate.integer("depth", self.depth, 1, validate.MAX_DEPTH)
        validate.integer("keep", self.keep, 1)
        validate.choice("verifier", self.verifier, validate.VERIFIERS)
        validate.choice("layout", self.layout, validate.LAYOUTS)
        validate.choice("asks", self.asks, validate.ASKS)
        if self.asks_tau is not None:
            validate.number("asks_tau", self.asks_tau)
        if self.asks_recompute is not None:
            validate.number("asks_recompute", self.asks_recompute, minimum=0, maximum=1)
        object.__setattr__(self, "early_stop", early.check_policies(self.early_stop))
        if self.thresholds is not None and not isinstance(self.thresholds, early.Thresholds):
            object.__setattr__(self, "thresholds", early.check_thresholds(self.thresholds))
        checks = [
            (self.verify or self.select != "verifier", "select=verifier needs the verifier (drop --no-verify)"),
            (self.depth == 1 or self.cache == "pool", "trees (--depth > 1) run on the block pool (--cache pool)"),
            (self.verifier != "continue" or self.cache == "pool",
             "--verifier continue reads each branch's KV from the block pool (--cache pool)"),
            (not self.early_stop or self.cache == "pool", "early exit runs on the block pool (--cache pool)"),
            (not self.early_stop or self.depth == 1, "early exit applies to best-of-N solves (--depth 1)"),
            (self.asks != "on" or self.cache == "pool", "ASKS reuses KV in the block pool (--cache pool)"),
        ]
        for ok, message in checks:
            if not ok:
                raise RkscError(message)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)

    @property
    def continue_verify(self) -> bool:
        return self.verifier == "continue" or (self.verifier == "auto" and self.cache == "pool")
