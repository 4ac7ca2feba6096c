"""The reasoning program: a tree of thoughts on the engine; best-of-N is the tree of depth 1.

The problem prefix runs once as a held sequence; each root branch forks it (copy-free) with its
own approach hint and decodes up to N tokens. At every later depth the K best unfinished nodes
(by verifier score on their partial solution, or by generation confidence without a verifier)
each fork B children: a child feeds its parent's last token, a short continuation cue, then
decodes N more tokens. Nodes that ended are final candidates as they are; the leaves of the last
depth join them. The verifier asks its question as a fork of each node's own KV ("continue"),
or as a fork of the problem prefix with the solution written out ("prompt", the paper's way).

With early exit (best-of-N only) the program resumes after every step that gives a branch a
token (`Progress`), lets the policies of rksc.reasoning.early read the streams, and cancels the
branches they stop; probes and incremental verifier questions are more sequences on the engine.

`grow` is a generator program for `Engine.run`: it adds sequences, yields the ones it waits for,
and returns a `TreeOutcome`. Whatever happens, its sequences are cancelled or released at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rksc.engine.api import EngineAPI
from rksc.engine.driver import Progress, failed, last_logits
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Asks, LayerExit, Sequence
from rksc.reasoning import early

CUES = ("\n\nNext, ", "\n\nLet me check the last step, then continue. ", "\n\nContinuing, ", "\n\nNow, ",
        "\n\nThe next step: ", "\n\nCarefully, ", "\n\nThen, ", "\n\nSo far so good. ")


@dataclass
class Node:
    depth: int
    parent: int | None  # index of the parent in the previous depth's node list
    cues: list[str]  # the approach hint, then one continuation cue per depth
    seq: Sequence  # the sequence that wrote its last part (its ids are the whole path)
    root: int  # index of the root branch it descends from
    token_ids: list[int] = field(default_factory=list)  # everything after the root prompt: generated and cue tokens
    token_probs: list[float] = field(default_factory=list)  # probabilities of the generated tokens only
    token_confs: list[float] = field(default_factory=list)  # their confidences, when tracked
    stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        """Ended with an end-of-sequence token."""
        return self.stop_reason == "finished"

    @property
    def confidence(self) -> float:
        return sum(self.token_probs) / len(self.token_probs) if self.token_probs else 0.0


@dataclass(frozen=True)
class Plan:
    """Everything one solve needs from the prompt builder, as token ids."""

    prefix_ids: list[int]
    suffix_ids: list[list[int]]  # one per root branch
    hints: list[str]
    cue_ids: list[list[int]]  # one per continuation cue
    continuation: Callable[[bool], list[int]]  # verifier question on top of a node (ended or not)
    verify_suffix: Callable[[list[int]], list[int]]  # the separate verifier prompt's suffix for a node's tokens
    max_new_tokens: int
    depth: int
    keep: int
    sampling: Sampling
    verify: bool
    continue_verify: bool
    eos: frozenset[int]
    early_stop: tuple[str, ...] = ()  # early-exit policies and gates (rksc.reasoning.early)
    thresholds: early.Thresholds = field(default_factory=early.Thresholds)
    select: str = "composite"
    answer_of: Callable[[list[int]], str | None] | None = None  # a branch's answer from its tokens
    probe_ids: list[int] = field(default_factory=list)  # the probe's answer cue
    probe_answer: Callable[[list[int]], str | None] | None = None  # the answer a probe's tokens give
    track_confidence: bool = False  # record per-token confidences (calibration, bench replay)
    record_margins: bool = False  # verifier questions record the lens margin after every layer (calibration)
    record_probes: bool = False  # probe every live branch every `every` tokens, stopping nothing (calibration)
    asks: Asks | None = None  # the prompts may reuse other prompts' KV approximately (rksc.engine.blend)


@dataclass
class TreeOutcome:
    nodes: list[Node] = field(default_factory=list)  # final candidates
    scores: list[float | None] = field(default_factory=list)  # verifier score per final node
    prefill_s: float = 0.0  # wall spans as this program saw them (other problems may share them)
    decode_s: float = 0.0
    verify_s: float = 0.0
    kv_peak: int | None = None  # None: the engine does not hold the KV (a remote backend)
    prefix_bytes: int | None = None
    prefix_cached_tokens: int = 0
    levels: list[dict] = field(default_factory=list)  # per depth: nodes, kept indices
    early: dict | None = None  # what early exit did (policies, gates fired, probes, KV freed)
    candidates: list[int] | None = None  # nodes the answer may be selected from (None: all)
    probe_reads: list[list[tuple[int, int, str | None]]] = field(default_factory=list)  # per node, every probe
    # read as (branch tokens when it started, branch tokens when its answer was read, the answer)
    verifier_skipped: bool = False
    final_asks: dict[int, Sequence] = field(default_factory=dict)  # final node -> its verifier question

    def ask_of(self, node: int) -> tuple[list[float], int | None]:
        """The layer margins and exit layer of the verifier question about final node `node`."""
        ask = self.final_asks.get(node)
        return ([], None) if ask is None or ask.out.lens is None else (ask.out.lens.margins, ask.out.lens.exit_layer)


def grow(engine: EngineAPI, plan: Plan, score_logits: Callable):
    """The program (a generator for `Engine.run`); returns a TreeOutcome. `score_logits` maps
    verifier logits [R, V] to scores."""
    out, created = TreeOutcome(), []

    def add(seq: Sequence) -> Sequence:
        created.append(seq)
        return engine.add(seq)

    try:
        t = time.perf_counter()
        prefix = add(Sequence(plan.prefix_ids, hold=True, asks=plan.asks))
        yield [prefix]
        failed([prefix])
        out.prefix_bytes = engine.kv_bytes([prefix])
        out.prefix_cached_tokens = prefix.out.cached_tokens
        track = plan.track_confidence or "confidence" in plan.early_stop
        roots = [Sequence(plan.prefix_ids + s, plan.max_new_tokens, plan.sampling, i, plan.eos, parent=prefix,
                          depth=1, hold=True, confidence=track, asks=plan.asks) for i, s in enumerate(plan.suffix_ids)]
        if plan.asks is not None and len(roots) > 1:
            # the first branch's prompt is computed first: the others may then read its KV
            add(roots[0])
            while not (roots[0].book.prefilled or roots[0].finished):
                yield Progress([roots[0]])
            roots[1:] = [add(s) for s in roots[1:]]
        else:
            roots = [add(s) for s in roots]
        nodes = [Node(1, None, [h], s, i) for i, (h, s) in enumerate(zip(plan.hints, roots))]
        if plan.early_stop or (plan.record_probes and plan.depth == 1):
            return (yield from _grow_early(engine, plan, prefix, nodes, add, out, score_logits, t))
        for depth in range(1, plan.depth + 1):
            seqs = [n.seq for n in nodes]
            yield seqs
            failed(seqs)
            first = max(s.out.prefilled_at for s in seqs)
            out.prefill_s += first - t
            out.decode_s += time.perf_counter() - first
            _peak(out, engine.kv_bytes([prefix] + seqs))
            for node in nodes:
                _absorb(node)
            open_ = [i for i, n in enumerate(nodes) if not n.finished]
            if depth == plan.depth or not open_:
                out.nodes += nodes
                out.levels.append({"depth": depth, "nodes": len(nodes), "kept": []})
                break
            out.nodes += [n for n in nodes if n.finished]
            candidates = [nodes[i] for i in open_]
            if plan.verify:
                scores, _ = yield from _score(plan, prefix, candidates, add, out, score_logits)
            else:
                scores = [n.confidence for n in candidates]
            kept = [i for _, i in sorted(zip(scores, open_), key=lambda p: (-p[0], p[1]))[:plan.keep]]
            out.levels.append({"depth": depth, "nodes": len(nodes), "kept": kept})
            t = time.perf_counter()
            children = []
            for i in kept:
                parent = nodes[i]
                for j in range(len(plan.suffix_ids)):
                    cue = plan.cue_ids[j % len(plan.cue_ids)]
                    seq = add(Sequence(parent.seq.ids + cue, plan.max_new_tokens, plan.sampling,
                                       (depth + 1) * 1000 + len(children), plan.eos, parent=parent.seq,
                                       depth=depth + 1, hold=True))
                    children.append(Node(depth + 1, i, parent.cues + [CUES[j % len(CUES)]], seq, parent.root,
                                         parent.token_ids + cue, list(parent.token_probs)))
            for i in open_:  # forks take what they need first; finished nodes stay for the verifier
                engine.release(nodes[i].seq)
            nodes = children
        out.scores = [None] * len(out.nodes)
        if plan.verify:
            out.scores, asks = yield from _score(plan, prefix, out.nodes, add, out, score_logits)
            out.final_asks = dict(enumerate(asks))
        return out
    finally:
        for seq in created:
            engine.cancel(seq)


def _absorb(node: Node) -> None:
    node.token_ids += node.seq.token_ids
    node.token_probs += node.seq.out.token_probs
    node.token_confs += node.seq.out.token_confs
    node.stop_reason = node.seq.stop_reason


def _grow_early(engine: EngineAPI, plan: Plan, prefix: Sequence, nodes: list[Node], add, out: TreeOutcome,
                score_logits: Callable, t: float):
    """Best-of-N with early exit: after every step that gives a branch tokens, the policies read
    the streams and may stop branches (their blocks go back to the pool at once). With `exact`
    and a verifier-weighted selection, each branch is verified as soon as it ends, so its weight
    can settle the answer before the others finish."""
    monitor = early.Monitor(len(nodes), early.build(plan.early_stop, plan.thresholds, plan.select))
    for node, view in zip(nodes, monitor.views):
        view.tokens, view.confs, view.probs = node.seq.token_ids, node.seq.out.token_confs, node.seq.out.token_probs
    weighted = plan.verify and plan.select != "vote"
    incremental = weighted and "exact" in plan.early_stop
    asks: dict[int, Sequence] = {}
    probes: dict[int, Sequence] = {}
    probing = "probe" in plan.early_stop or plan.record_probes
    probe_log = {"probes": 0, "prompt_tokens": 0, "cached_tokens": 0, "tokens": 0}
    reads: list[list[tuple[int, int, str | None]]] = [[] for _ in nodes]
    freed = 0
    first = None
    while monitor.live or any(not a.finished for a in asks.values()):
        waiting = [nodes[i].seq for i in monitor.live] + [a for a in asks.values() if not a.finished] \
            + list(probes.values())
        yield Progress(waiting)
        failed(waiting)
        if first is None and all(n.seq.book.prefilled for n in nodes):
            first = max(n.seq.out.prefilled_at for n in nodes)
        for i in monitor.live:
            seq = nodes[i].seq
            if seq.finished:
                answer = plan.answer_of(seq.token_ids)
                monitor.end(i, seq.stop_reason, answer, None if weighted else monitor.views[i].confidence)
                if incremental:
                    asks[i] = add(_ask(plan, prefix, nodes[i], seq.stop_reason == "finished"))
        for i, ask in asks.items():
            if ask.finished and monitor.views[i].weight is None:
                monitor.weigh(i, verdicts([ask], score_logits)[0])
        if probing:
            _probes(engine, plan, nodes, monitor, probes, probe_log, add, reads)
        for i, reason in monitor.decide():
            seq = nodes[i].seq
            freed += len(seq.table.blocks) if seq.table is not None else 0
            engine.cancel(seq)
            seq.stop_reason = reason
            if i in probes:
                engine.cancel(probes.pop(i))
    now = time.perf_counter()
    first = first or now
    out.prefill_s += first - t
    out.decode_s += now - first
    for node in nodes:
        _absorb(node)
    out.nodes = nodes
    out.candidates = [i for i, v in enumerate(monitor.views) if v.candidate]
    out.probe_reads = reads
    _peak(out, engine.kv_bytes([prefix] + [n.seq for n in nodes]))
    out.scores = [None] * len(nodes)
    if plan.verify:
        out.verifier_skipped = "skip" in plan.early_stop and not incremental and early.skip_verifier(
            monitor.views, plan.thresholds)
        if not out.verifier_skipped:
            todo = [i for i in out.candidates if i not in asks]
            scores, done = (yield from _score(plan, prefix, [nodes[i] for i in todo], add, out, score_logits)) \
                if todo else ([], [])
            out.final_asks.update(zip(todo, done))
            for i, s in zip(todo, scores):
                out.scores[i] = s
            for i, ask in asks.items():
                out.scores[i] = monitor.views[i].weight
    out.final_asks.update(asks)
    block = engine.block_bytes()
    out.early = {
        "policies": list(plan.early_stop),
        "fired": [vars(f) for f in monitor.fired],
        "stop_reasons": [n.stop_reason for n in nodes],
        "kv_freed_bytes": None if block is None else freed * block,
        "cap_tokens_left": sum(plan.max_new_tokens - len(n.seq.token_ids) for n in nodes
                               if n.stop_reason in early.STOP_REASONS),
        "verifier_skipped": out.verifier_skipped,
        "verified_incrementally": incremental,
        "exit_layers": {i: a.out.lens.exit_layer if a.out.lens else None for i, a in out.final_asks.items()}
        if "layers" in plan.early_stop else None,
        # decoder layers the verifier questions' steps did not run (every question of the step had exited)
        "verifier_layers_skipped": sum(a.out.lens.layers_skipped for a in out.final_asks.values()
                                       if a.out.lens and a.out.lens.margins and a.out.lens.exit_layer is not None),
        "steps": max((len(n.seq.token_ids) for n in nodes), default=0),  # decode steps of the longest branch
    }
    if probing:
        out.early["probe"] = probe_log
        out.early["probe_every"] = plan.thresholds.every
    return out


def _ask(plan: Plan, prefix: Sequence, node: Node, ended: bool) -> Sequence:
    """The verifier question on top of a node: a fork of its KV, or of the problem prefix. With
    the `layers` gate (or when recording margins for calibration) it carries a layer exit."""
    exit_ = None
    th = plan.thresholds
    if "layers" in plan.early_stop:
        exit_ = LayerExit(th.exit_margin, th.exit_patience, th.exit_min_layer)
    elif plan.record_margins:
        exit_ = LayerExit(math.inf)  # never exits; records the margin after every layer
    if plan.continue_verify:
        return Sequence(node.seq.ids + plan.continuation(ended), parent=node.seq, depth=node.depth, keep_logits=True,
                        layer_exit=exit_)
    return Sequence(plan.prefix_ids + plan.verify_suffix(node.token_ids or node.seq.token_ids), parent=prefix,
                    depth=1, keep_logits=True, layer_exit=exit_)


def verdicts(asks: list[Sequence], score_logits: Callable) -> list[float]:
    """Verifier scores: the lens score of a question that exited early, else from its logits."""
    failed(asks)
    full = [i for i, s in enumerate(asks) if s.out.lens is None or s.out.lens.exit_layer is None]
    scores = dict(zip(full, score_logits(last_logits([asks[i] for i in full])) if full else []))
    return [scores[i] if i in scores else asks[i].out.lens.score for i in range(len(asks))]


PROBE_TOKENS = 8  # tokens a probe may write after its answer cue


def _probes(engine: EngineAPI, plan: Plan, nodes: list[Node], monitor: early.Monitor, probes: dict, log: dict,
            add, reads: list[list]) -> None:
    """Read finished probes into the branches' views (and `reads`); start a probe for every live
    branch that reached a multiple of `every` tokens. A probe is a new sequence: the branch's tokens
    and the answer cue; the branch's full blocks come from the prefix index, so it computes only the
    branch's last partial block, the cue and a few answer tokens."""
    every = plan.thresholds.every
    for i, probe in list(probes.items()):
        if not probe.finished and monitor.views[i].done:  # its branch ended first
            del probes[i]
            engine.cancel(probe)
        elif probe.finished:
            del probes[i]
            answer = plan.probe_answer(probe.token_ids)
            started = len(probe.prompt_ids) - len(plan.probe_ids) - len(nodes[i].seq.prompt_ids)
            reads[i].append((started, len(nodes[i].seq.token_ids), answer))
            monitor.probed(i, answer)
            log["tokens"] += len(probe.token_ids)
            log["cached_tokens"] += probe.out.cached_tokens
    for i in monitor.live:
        seq = nodes[i].seq
        n = len(seq.token_ids)
        if i not in probes and n and n % every == 0 and not seq.finished:
            probe = Sequence(seq.ids + plan.probe_ids, PROBE_TOKENS, Sampling(), 0, plan.eos, depth=1)
            probes[i] = add(probe)
            log["probes"] += 1
            log["prompt_tokens"] += probe.num_tokens


def _score(plan: Plan, prefix: Sequence, nodes: list[Node], add, out: TreeOutcome, score_logits: Callable):
    """Verifier scores of (partial) solutions, each a prompt-only sequence forking the node's KV
    (continue) or the problem prefix (prompt); returns the scores and the questions."""
    t = time.perf_counter()
    asks = [add(_ask(plan, prefix, n, n.finished)) for n in nodes]
    yield asks
    scores = verdicts(asks, score_logits)
    out.verify_s += time.perf_counter() - t
    return scores, asks


def _peak(out: TreeOutcome, kv_bytes: int | None) -> None:
    """Keep the largest KV the solve held; None: the engine holds its KV elsewhere."""
    if kv_bytes is not None:
        out.kv_peak = max(out.kv_peak or 0, kv_bytes)
