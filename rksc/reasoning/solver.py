"""Multi-branch solving of one problem: shared prefix, B branches decoded together, verifier, selection.

    solver = Solver.load("qwen2.5-coder-0.5b")
    result = solver.solve("Natalia sold ...", branches=8, max_new_tokens=512)
    print(result.answer, result.timing.total_s)
    for index, result in solver.solve_many(questions, concurrency=4):  # 4 problems in flight
        ...

On the block pool (the default) every solve is a program on the engine (rksc.reasoning.tree:
a best-of-N solve is a tree of depth 1), so several problems can share each decode step.

With `cache="none"` the same work runs without a shared prefix (the paper's No-KV baseline):
every branch and every verification row carries its whole prompt, still batched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

from rksc import validate
from rksc.cache import DEFAULT_POLICY, pool_args
from rksc.engine.baselines import NoKVBaseline, SharedBaseline
from rksc.engine.driver import run_programs
from rksc.engine.engine import Engine
from rksc.engine.lens import LogitLens
from rksc.engine.prompts import BranchContext, Prompt, PromptBuilder, hints_for
from rksc.engine.remote import OpenAIBackend
from rksc.engine.dense import DenseRunner
from rksc.engine.sequence import Asks
from rksc.engine.verifier import Verifier
from rksc.errors import ProgramError, RkscError
from rksc.models.loader import load, load_tokenizer
from rksc.reasoning import answers, early, profiles, tree
from rksc.reasoning.config import SolveConfig
from rksc.reasoning.problem import Problem, Reader, cue_ids
from rksc.reasoning.result import Branch, SolveResult, Timing
from rksc.reasoning.select import Candidate, select

VERIFY_RESERVE = 96  # tokens the verifier question (or an early-exit probe) adds around a branch's text
CUE_RESERVE = 16  # tokens of a tree's continuation cue


class Solver:
    def __init__(self, lm, kv_budget: int | None = None, block_size: int = 16, evict: str = DEFAULT_POLICY,
                 max_rows: int = 64, prefill_chunk: int = 512, engine=None):
        """`kv_budget`: bytes for the KV block pool (default: a quarter of the available memory);
        `max_rows`: sequences decoded together at most; `prefill_chunk`: prompt tokens per step.
        `engine`: something else with the engine's surface (a remote backend, see `connect`); the
        one-at-a-time baselines then do not exist."""
        self.lm = lm
        self.prompts = PromptBuilder(lm.tokenizer)
        self._cue_ids = cue_ids(self.prompts)  # a tree's continuation cues, tokenized once
        self.eos = eos_ids(lm)
        self.remote = engine is not None
        if self.remote:
            self.runner, self.verifier, self.engine, self.baselines = None, Verifier(None, lm.tokenizer), engine, {}
        else:
            kv_budget, block_size, evict = pool_args(kv_budget, block_size, evict)
            pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
            # the baselines (--cache shared|none) run one problem at a time on a per-batch DynamicCache
            self.runner = DenseRunner(lm.model, pad_id=pad)
            self.verifier = Verifier(self.runner, lm.tokenizer)
            lens = LogitLens(lm.model, self.verifier.yes.tolist(), self.verifier.no.tolist())  # verifier layer exit
            self.engine = Engine(lm.model, self.eos, kv_budget or default_kv_budget(), block_size, evict,
                                 max_rows, prefill_chunk, lens)
            self.baselines = {
                "shared": SharedBaseline(self.runner, self.verifier, self.eos, "shared"),
                "none": NoKVBaseline(self.runner, self.verifier, self.eos, "none"),
            }
        self._profile: profiles.Profile | None | bool = False  # loaded on first use
        self._asks_calibration: dict | None | bool = False  # likewise
        self.track_confidence = False  # record per-token confidences in every branch (calibration, bench replay)
        self.record_margins = False  # verifier questions record lens margins layer by layer (calibration)
        self.record_probes = False  # every branch is probed for its current answer, nothing stopped (calibration)

    @property
    def profile(self) -> profiles.Profile | None:
        """The model's early-exit calibration (rksc calibrate), or None."""
        if self._profile is False:
            self._profile = profiles.find(self.lm.name)
        return self._profile

    def early_settings(self, config: SolveConfig) -> tuple[tuple[str, ...], early.Thresholds]:
        """The policies and thresholds a solve with `config` uses; "cgee" is the profile's combination.
        A lossy policy needs thresholds calibrated for the model, or set by hand."""
        names, given = config.early_stop, config.thresholds
        if not names:
            return (), given if isinstance(given, early.Thresholds) else early.Thresholds()
        profile = self.profile
        if "cgee" in names:
            if profile is None:
                raise RkscError(f"--early-stop cgee needs a calibration profile for {self.lm.name}; "
                                f"run `rksc calibrate --model {self.lm.name}` first")
            names = tuple(dict.fromkeys(p for n in names for p in (profile.policies if n == "cgee" else (n,))))
        if isinstance(given, early.Thresholds):  # everything set by hand
            return names, given
        base = profile.thresholds if profile is not None else early.Thresholds()
        by_hand = set(given or ())
        thresholds = replace(base, **given) if given else base
        calibrated = set(profile.calibrated) if profile is not None else set()
        missing = [n for n in names if n in early.CALIBRATED and n not in calibrated
                   and not by_hand & set(early.FIELDS[n])]
        if missing:
            has = "has no calibration profile" if profile is None else "has a profile without them"
            raise RkscError(f"--early-stop {','.join(missing)} needs thresholds calibrated for {self.lm.name}, which "
                            f"{has}; run `rksc calibrate --model {self.lm.name}`, or set them by hand with "
                            f"--thresholds ({', '.join(f for n in missing for f in early.FIELDS[n])})")
        return names, thresholds

    def asks_settings(self, config: SolveConfig) -> Asks | None:
        """The approximate-reuse setting of the solve's prompts: None when off. `auto` is on where the
        model's calibration passed its answer guard (`rksc asks-calibrate`) or a tau is given, on the
        block pool of a local engine."""
        if config.asks == "off" or (config.asks == "auto" and (self.remote or config.cache != "pool")):
            return None
        if self._asks_calibration is False:
            self._asks_calibration = profiles.find_asks(self.lm.name)
        calibrated = self._asks_calibration or {}
        if config.asks == "auto" and config.asks_tau is None and not profiles.asks_guarded(calibrated):
            return None  # a tau given by hand turns it on
        tau = config.asks_tau if config.asks_tau is not None else calibrated.get("tau")
        if tau is None:
            raise RkscError(profiles.asks_missing(self.lm.name))
        recompute = config.asks_recompute if config.asks_recompute is not None else calibrated.get("recompute", 0.15)
        return Asks(float(tau), float(recompute), int(calibrated.get("min_run", 8)), int(calibrated.get("probe", 1)))

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "auto", threads: int | None = None,
             weights: str = "auto", **pool) -> Solver:
        solver_args(threads, **pool)  # before the slow load
        return cls(load(model, dtype, threads, weights), **pool)

    @classmethod
    def open(cls, backend: str | None = None, backend_model: str | None = None, api_key: str | None = None,
             **load_kwargs) -> Solver:
        """`load` (the keyword arguments of `load`), or `connect` when `backend` is a server URL: the
        one way in for the command line and for Ray workers."""
        if backend:
            return cls.connect(backend, load_kwargs.get("model"), backend_model, api_key)
        return cls.load(**load_kwargs)

    @classmethod
    def connect(cls, url: str, model: str | None = None, served_model: str | None = None,
                api_key: str | None = None, max_inflight: int = 64, timeout: float = 600.0) -> Solver:
        """A solver on a model behind an OpenAI-compatible server (rksc serve, vLLM, SGLang,
        llama.cpp): `model` names its tokenizer here (a registry name or a Hugging Face folder),
        `served_model` its id on the server (default: the only one it serves)."""
        validate.text("backend", url)
        if not url.startswith(("http://", "https://")):
            raise RkscError(f"--backend must be an http:// or https:// URL (got {url!r})")
        lm = load_tokenizer(model)
        backend = OpenAIBackend(url, lm.tokenizer, eos_ids(lm), served_model, api_key, max_inflight, timeout)
        if backend.features.max_context:
            lm.context_limit = backend.features.max_context
        return cls(lm, engine=backend)

    def prefix_stats(self) -> tuple[int, int]:
        """Prompt tokens the prefix index reused, of those looked up (0, 0 on a remote backend,
        whose prefix cache is the server's)."""
        if self.remote:
            return 0, 0
        stats = self.engine.pool.stats
        return stats.hit_tokens, stats.queried_tokens

    def close(self) -> None:
        """Stop a remote backend's connections (a local engine holds nothing to close)."""
        self.engine.close()

    def solve(self, question: str, config: SolveConfig | None = None, gold: str | None = None,
              baseline=None, context: str | list[BranchContext] = "", **overrides) -> SolveResult:
        """Solve one problem. `baseline` overrides config.cache (the benchmark passes its own);
        `context` is extra text placed before the problem in the shared prefix, or one BranchContext per
        branch (earlier chat turns and text before the problem, each branch's own)."""
        config = replace(config or SolveConfig(), **overrides)
        if baseline is not None or config.cache != "pool":
            if baseline is None and config.cache not in self.baselines:
                raise RkscError(f"--cache {config.cache} is a local baseline; a remote backend runs the engine "
                                "path (--cache pool)")
            return self._solve_baseline(question, config, gold, baseline or self.baselines[config.cache], context)
        item = {"question": question, "gold": gold, "context": context}
        (_, result), = self.solve_many([item], config, concurrency=1)
        if isinstance(result, RkscError):
            raise result
        return result

    def solve_many(self, problems: Iterable[str | dict], config: SolveConfig | None = None,
                   concurrency: int | None = None, **overrides) -> Iterator[tuple[int, SolveResult | RkscError]]:
        """Solve problems with up to `concurrency` in flight on the engine (their branches share
        every decode step). Yields (index, result) in input order, each as soon as it and every
        earlier problem are done; a problem that fails yields its RkscError (a ProgramError for
        anything else its program raised; its sequences are cancelled) and the rest go on.
        A problem is a question string or a dict with "question" and optional "gold", "context"
        (text before the problem in the shared prefix, or one BranchContext per branch) and "answer_format"."""
        config = replace(config or SolveConfig(), **overrides)
        if config.cache != "pool":
            raise RkscError("solve_many runs on the block pool engine (cache='pool')")
        if concurrency is None:
            concurrency = default_concurrency(config)
        concurrency = validate.integer("concurrency", concurrency, 1, validate.MAX_CONCURRENCY)
        programs = (self.program(p, config) for p in problems)
        done, upcoming = {}, 0
        for index, result in run_programs(self.engine, programs, concurrency, errors=(Exception,)):
            done[index] = ProgramError.of(result) if isinstance(result, Exception) else result
            while upcoming in done:
                yield upcoming, done.pop(upcoming)
                upcoming += 1

    def program(self, problem: str | dict, config: SolveConfig):
        """One problem's solve as an engine program (rksc.engine.engine): for an owner that steps the
        engine itself and admits problems as they arrive (the server, benchmarks/eviction.py)."""
        item = {"question": problem} if isinstance(problem, str) else problem
        if not isinstance(item, dict):
            raise RkscError(f"a problem is a question string or a dict (got {type(problem).__name__})")
        question, gold, context = validate.problem(item.get("question"), item.get("gold"), item.get("context", ""),
                                                   self.lm)
        config = replace(config, answer_format=item.get("answer_format") or config.answer_format)
        t_start = time.perf_counter()
        problem = self.problem(question, config, contexts(context))
        names, thresholds = self.early_settings(config)
        record = tree.Recording(self.track_confidence, self.record_margins, self.record_probes)
        search = tree.Search(config.max_new_tokens, config.depth, config.keep, config.sampling,
                             frozenset(self.eos), config.verify, config.continue_verify, config.select, names,
                             thresholds, self.asks_settings(config), record)
        grown = yield from tree.grow(self.engine, problem, search, self.verifier)
        timing = Timing(grown.prefill_s, grown.decode_s, grown.verify_s, new_tokens=grown.new_tokens)
        branches = []
        for i, n in enumerate(grown.nodes):
            margins, exit_layer = grown.question_of(i)
            answer = problem.reader.answer(n.token_ids)
            if n.stop_reason == "probe-stable":  # stopped by early exit with the answer its probes read
                answer = grown.probe_reads[i][-1][2]
            root = problem.suffixes[n.root]
            branches.append(Branch(
                i, " | ".join(c.strip() for c in n.cues), problem.prefix.text + root.text,
                problem.prefix.ids + root.ids, n.token_ids, problem.reader.text(n.token_ids), answer,
                n.confidence, grown.scores[i], n.finished, n.depth, n.parent, n.stop_reason,
                token_confs=n.token_confs, token_probs=n.token_probs if self.track_confidence else [],
                verifier_margins=margins, verifier_exit_layer=exit_layer,
                probes=grown.probe_reads[i] if grown.probe_reads else []))
        kv = {"prefix": grown.prefix_bytes, "decode_peak": grown.kv_peak}
        if grown.prefix_bytes is None:  # the KV is on a server: only the prompt tokens its cache served are known
            kv = {"server_cached_tokens": sum(n.seq.out.cached_tokens for n in grown.nodes if n.depth == 1)}
        if grown.early is not None and config.thresholds is not None:  # uncalibrated: the fields set by hand
            # that this solve's policies read (a field no policy reads changed nothing)
            grown.early["by_hand"] = (sorted(f for f in config.thresholds if any(f in early.FIELDS.get(n, ())
                                                                             for n in names))
                                      if isinstance(config.thresholds, dict) else ["all"])
        if grown.prefix_cached_tokens:
            kv["prefix_cached_tokens"] = grown.prefix_cached_tokens
        if search.asks is not None:  # what approximate reuse did with each branch's prompt (None: no donor)
            kv["asks"] = [n.seq.out.asks_report for n in grown.nodes if n.depth == 1]
        # early exit: consensus-stopped and pruned branches are no candidates (unless nothing else is)
        return self._result(question, gold, config, problem, branches, timing, kv, t_start, grown.candidates,
                            "vote" if grown.verifier_skipped else config.select,
                            grown.levels if config.depth > 1 else [], grown.early)

    def problem(self, question: str, config: SolveConfig, context: str | list[BranchContext] = "") -> Problem:
        """A validated problem (see validate.problem) laid out as token ids, with its reader. `context` is
        text before the problem in the shared prefix, or one BranchContext per branch (each branch's
        prompt written whole; the prefix is what they all begin with)."""
        kind = answers.answer_kind(question) if config.answer_format == "auto" else config.answer_format
        letters = answers.choice_letters(question) or "ABCDE"
        diverse = config.layout == "diverse"
        hints = hints_for(config.branches, config.hints, diverse)
        if isinstance(context, str):
            layout = (self.prompts.diverse_layout if diverse else self.prompts.layout)(question, context)
            suffixes = [self.prompts.branch(layout, h, kind) for h in hints]
        else:
            if diverse:
                raise RkscError("per-branch contexts write each branch's prompt whole: use layout 'shared'")
            if len(context) != config.branches:
                raise RkscError(f"{len(context)} branch contexts for {config.branches} branches")
            layout, suffixes = self.prompts.branch_prompts(question, context, hints, kind)
        self._check_context(layout.prefix, suffixes, config)
        reader = Reader(self.prompts, layout, kind, letters, self._cue_ids)
        return Problem(layout.prefix, suffixes, hints, reader)

    def _solve_baseline(self, question, config: SolveConfig, gold, baseline, context) -> SolveResult:
        """The one-problem-at-a-time baselines on a per-batch cache (depth 1 only)."""
        if config.depth > 1:
            raise RkscError("trees run on the block pool (--cache pool)")
        question, gold, context = validate.problem(question, gold, context, self.lm)
        t_start = time.perf_counter()
        problem = self.problem(question, config, contexts(context))
        reader = problem.reader
        try:
            gen = baseline.generate(problem.prefix_ids, problem.suffix_ids, config.max_new_tokens, config.sampling)
            traces, kv = gen.traces, dict(gen.kv_bytes)
            timing = Timing(gen.prefill_s, gen.decode_s, new_tokens=sum(len(tr.token_ids) for tr in traces))
            scores: list[float | None] = [None] * len(traces)
            if config.verify:
                ver = baseline.verify(problem.prefix_ids, [reader.verify_suffix(tr.token_ids) for tr in traces])
                scores, timing.verify_s, kv["verify_peak"] = ver.scores, ver.seconds, ver.kv_bytes
        finally:
            baseline.finish()
        branches = [
            Branch(i, problem.hints[i], problem.prefix.text + problem.suffixes[i].text,
                   problem.prefix.ids + problem.suffixes[i].ids, tr.token_ids, reader.text(tr.token_ids),
                   reader.answer(tr.token_ids), tr.confidence, scores[i], tr.finished,
                   stop_reason="finished" if tr.finished else "length")
            for i, tr in enumerate(traces)
        ]
        return self._result(question, gold, config, problem, branches, timing, kv, t_start)

    def _result(self, question: str, gold: str | None, config: SolveConfig, problem: Problem,
                branches: list[Branch], timing: Timing, kv: dict, t_start: float,
                candidates: list[int] | None = None, method: str | None = None, levels: list | None = None,
                early_report: dict | None = None) -> SolveResult:
        """Select the answer among the candidate branches (all by default) and build the result."""
        pool = candidates or list(range(len(branches)))
        pick = select([Candidate(branches[i].answer, branches[i].confidence, branches[i].verifier) for i in pool],
                      method or config.select)
        chosen = pool[pick]
        timing.total_s = time.perf_counter() - t_start
        return SolveResult(question, branches[chosen].answer, chosen, problem.reader.kind, self.lm.name, config,
                           len(problem.prefix_ids), branches, timing, kv, gold, levels or [], early_report)

    def _check_context(self, prefix: Prompt, suffixes: list[Prompt], config: SolveConfig) -> None:
        generated = config.depth * config.max_new_tokens + (config.depth - 1) * CUE_RESERVE
        need = len(prefix.ids) + max(len(s.ids) for s in suffixes) + generated
        if config.verify:
            need = max(need, len(prefix.ids) + generated + VERIFY_RESERVE)
        if need > self.lm.max_context:
            raise RkscError(f"prompt too long: {len(prefix.ids)} prefix tokens + suffix + "
                            f"{generated} new tokens need {need} positions, but "
                            f"{self.lm.name} has a context of {self.lm.max_context}")


def default_concurrency(config: SolveConfig) -> int:
    """Problems in flight by default: about 32 decode rows (a step of 32 rows costs well under
    twice a step of 8 on a CPU, so fuller steps give more problems per hour)."""
    rows = config.branches * (config.keep if config.depth > 1 else 1)
    return max(1, 32 // rows)


def solver_args(threads: int | None = None, kv_budget: int | None = None, block_size: int = 16,
                evict: str | None = None, **engine) -> None:
    """Everything Solver.load takes besides the model, checked before the (slow) model load
    (other engine options are checked where they are used)."""
    validate.thread_count(threads)
    pool_args(kv_budget, block_size, evict)


def default_kv_budget() -> int:
    """A quarter of the available memory (rksc solve touches pages only as blocks fill)."""
    return max((validate.available_memory() or 4 << 30) // 4, 64 << 20)


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


def contexts(context: str | list[tuple[tuple[dict, ...], str]]) -> str | list[BranchContext]:
    """A validated context (validate.problem) as Solver.problem takes it."""
    return context if isinstance(context, str) else [BranchContext(history, preamble) for history, preamble in context]
