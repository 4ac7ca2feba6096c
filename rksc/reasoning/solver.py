"""Multi-branch solving of one problem: shared prefix, B branches decoded together, verifier, selection.

    solver = Solver.load("qwen2.5-coder-0.5b")
    result = solver.solve("Natalia sold ...", branches=8, max_new_tokens=256)
    print(result.answer, result.timing.total_s)

With `shared=False` the same work runs the naive way (each branch and each verification
prefilled on its own, one at a time): the baseline that the shared path is measured against.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace

from rksc.engine.decode import Trace, collect, decode
from rksc.engine.prompts import Prompt, PromptBuilder, hints_for
from rksc.engine.runner import Prefix, Runner
from rksc.engine.sampler import Sampler, Sampling
from rksc.engine.verifier import Verifier
from rksc.errors import RkscError
from rksc.reasoning import answers
from rksc.reasoning.select import METHODS, Candidate, select

FORMATS = ("auto", "number", "choice")
VERIFY_RESERVE = 96  # tokens the verifier question adds around a branch's text


@dataclass(frozen=True)
class SolveConfig:
    branches: int = 8
    max_new_tokens: int = 256
    select: str = "composite"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    hints: bool = True  # a distinct approach hint per branch
    verify: bool = True
    shared: bool = True  # False: the naive baseline, every prompt prefilled on its own
    answer_format: str = "auto"

    def __post_init__(self):
        checks = [
            (self.branches >= 1, f"branches must be at least 1 (got {self.branches})"),
            (self.max_new_tokens >= 1, f"max-new-tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.select in METHODS, f"select must be one of {', '.join(METHODS)} (got '{self.select}')"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1] (got {self.top_p})"),
            (self.answer_format in FORMATS, f"answer-format must be one of {', '.join(FORMATS)}"),
            (self.verify or self.select != "verifier", "select=verifier needs the verifier (drop --no-verify)"),
        ]
        for ok, message in checks:
            if not ok:
                raise RkscError(message)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


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

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Timing:
    prefill_s: float = 0.0  # the shared problem prefix (all full prompts, in naive mode)
    decode_s: float = 0.0  # branch suffixes and token-by-token generation
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


class Solver:
    def __init__(self, lm):
        self.lm = lm
        self.prompts = PromptBuilder(lm.tokenizer)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.runner = Runner(lm.model, pad_id=pad)
        self.verifier = Verifier(self.runner, lm.tokenizer)
        self.eos = eos_ids(lm)

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "bfloat16", threads: int | None = None) -> Solver:
        from rksc.models.loader import load

        return cls(load(model, dtype, threads))

    def solve(self, question: str, config: SolveConfig | None = None, gold: str | None = None,
              **overrides) -> SolveResult:
        config = replace(config or SolveConfig(), **overrides)
        if not question or not question.strip():
            raise RkscError("the question is empty")
        kind = answers.answer_kind(question) if config.answer_format == "auto" else config.answer_format
        letters = answers.choice_letters(question) or "ABCDE"
        t_start = time.perf_counter()
        layout = self.prompts.layout(question)
        hints = hints_for(config.branches, config.hints)
        suffixes = [self.prompts.branch(layout, h, kind) for h in hints]
        self._check_context(layout.prefix, suffixes, config)

        timing, kv = Timing(), {}
        prefix = None
        if config.shared:
            t = time.perf_counter()
            prefix = self.runner.prefill(layout.prefix.ids)
            timing.prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            batch, logits = self.runner.extend(prefix, [s.ids for s in suffixes])
            traces = collect(decode(self.runner, batch, logits, Sampler(config.sampling, len(suffixes)),
                                    config.max_new_tokens, self.eos), len(suffixes))
            timing.decode_s = time.perf_counter() - t
            kv = {"prefix": prefix.nbytes, "decode_peak": batch.kv_bytes}
            del batch
        else:
            traces = [self._naive_branch(layout.prefix.ids + s.ids, i, config, timing, kv)
                      for i, s in enumerate(suffixes)]
        texts = [self.prompts.decode(tr.token_ids) for tr in traces]

        scores: list[float | None] = [None] * len(traces)
        if config.verify:
            t = time.perf_counter()
            vsuffixes = [self.prompts.verify(layout, text).ids for text in texts]
            if config.shared:
                scores, kv["verify_peak"] = self.verifier.score(prefix, vsuffixes)
            else:
                scores = [self._naive_verify(layout.prefix.ids + v, kv) for v in vsuffixes]
            timing.verify_s = time.perf_counter() - t

        found = [answers.extract(text, kind, letters) for text in texts]
        cands = [Candidate(a, tr.confidence, s) for a, tr, s in zip(found, traces, scores)]
        chosen = select(cands, config.select)
        timing.total_s = time.perf_counter() - t_start
        timing.new_tokens = sum(len(tr.token_ids) for tr in traces)
        branches = [
            Branch(i, hints[i], layout.prefix.text + suffixes[i].text, layout.prefix.ids + suffixes[i].ids,
                   tr.token_ids, texts[i], found[i], tr.confidence, scores[i], tr.finished)
            for i, tr in enumerate(traces)
        ]
        return SolveResult(question, found[chosen], chosen, kind, self.lm.name, config,
                           len(layout.prefix.ids), branches, timing, kv, gold)

    def _check_context(self, prefix: Prompt, suffixes: list[Prompt], config: SolveConfig) -> None:
        need = len(prefix.ids) + max(len(s.ids) for s in suffixes) + config.max_new_tokens
        if config.verify:
            need = max(need, len(prefix.ids) + config.max_new_tokens + VERIFY_RESERVE)
        if need > self.lm.max_context:
            raise RkscError(f"prompt too long: {len(prefix.ids)} prefix tokens + suffix + "
                            f"{config.max_new_tokens} new tokens need {need} positions, but "
                            f"{self.lm.name} has a context of {self.lm.max_context}")

    def _prefill_all_but_last(self, ids: list[int], timing: Timing | None) -> tuple[Prefix, list[int]]:
        t = time.perf_counter()
        prefix = self.runner.prefill(ids[:-1])
        if timing is not None:
            timing.prefill_s += time.perf_counter() - t
        return prefix, ids[-1:]

    def _naive_branch(self, ids: list[int], index: int, config: SolveConfig, timing: Timing,
                      kv: dict) -> Trace:
        prefix, last = self._prefill_all_but_last(ids, timing)
        t = time.perf_counter()
        batch, logits = self.runner.extend(prefix, [last])
        sampler = Sampler(config.sampling, rows=1, first_branch=index)
        (trace,) = collect(decode(self.runner, batch, logits, sampler, config.max_new_tokens, self.eos), 1)
        timing.decode_s += time.perf_counter() - t
        kv["decode_peak"] = max(kv.get("decode_peak", 0), batch.kv_bytes)
        return trace

    def _naive_verify(self, ids: list[int], kv: dict) -> float:
        prefix, last = self._prefill_all_but_last(ids, None)
        (score,), held = self.verifier.score(prefix, [last])
        kv["verify_peak"] = max(kv.get("verify_peak", 0), held)
        return score


def eos_ids(lm) -> set[int]:
    """End-of-sequence ids: the tokenizer's and generation config's, plus common end-of-turn tokens."""
    tok, ids = lm.tokenizer, set()
    for source in (tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>") if t in vocab)
    return ids


def config_fields() -> list[str]:
    return [f.name for f in fields(SolveConfig)]
