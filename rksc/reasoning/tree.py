"""The reasoning program: a tree of thoughts on the engine; best-of-N is the tree of depth 1.

The problem prefix runs once as a held sequence; each root branch forks it (copy-free) with its
own approach hint and decodes up to N tokens. At every later depth the K best unfinished nodes
(by verifier score on their partial solution, or by generation confidence without a verifier)
each fork B children: a child feeds its parent's last token, a short continuation cue, then
decodes N more tokens. Nodes that ended are final candidates as they are; the leaves of the last
depth join them. The verifier asks its question as a fork of each node's own KV ("continue"),
or as a fork of the problem prefix with the solution written out ("prompt", the paper's way).

`grow` is a generator program for `Engine.run`: it adds sequences, yields the ones it waits for,
and returns a `TreeOutcome`. Whatever happens, its sequences are cancelled or released at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rksc.engine.engine import Engine, last_logits
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError

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


@dataclass
class TreeOutcome:
    nodes: list[Node] = field(default_factory=list)  # final candidates
    scores: list[float | None] = field(default_factory=list)  # verifier score per final node
    prefill_s: float = 0.0  # wall spans as this program saw them (other problems may share them)
    decode_s: float = 0.0
    verify_s: float = 0.0
    kv_peak: int = 0
    prefix_bytes: int = 0
    prefix_cached_tokens: int = 0
    levels: list[dict] = field(default_factory=list)  # per depth: nodes, kept indices


def grow(engine: Engine, plan: Plan, score_logits: Callable):
    """The program (a generator for `Engine.run`); returns a TreeOutcome. `score_logits` maps
    verifier logits [R, V] to scores."""
    out, created = TreeOutcome(), []

    def add(seq: Sequence) -> Sequence:
        created.append(seq)
        return engine.add(seq)

    try:
        t = time.perf_counter()
        prefix = add(Sequence(plan.prefix_ids, hold=True))
        yield [prefix]
        _check([prefix])
        out.prefix_bytes = engine.runner.kv_bytes([prefix.table])
        out.prefix_cached_tokens = prefix.cached_tokens
        nodes = [Node(1, None, [h], add(Sequence(plan.prefix_ids + s, plan.max_new_tokens, plan.sampling, i,
                                                 plan.eos, parent=prefix, depth=1, hold=True)), i)
                 for i, (h, s) in enumerate(zip(plan.hints, plan.suffix_ids))]
        for depth in range(1, plan.depth + 1):
            seqs = [n.seq for n in nodes]
            yield seqs
            _check(seqs)
            first = max(s.prefilled_at for s in seqs)
            out.prefill_s += first - t
            out.decode_s += time.perf_counter() - first
            out.kv_peak = max(out.kv_peak, engine.runner.kv_bytes([prefix.table] + [s.table for s in seqs]))
            for node in nodes:
                node.token_ids += node.seq.token_ids
                node.token_probs += node.seq.token_probs
                node.stop_reason = node.seq.stop_reason
            open_ = [i for i, n in enumerate(nodes) if not n.finished]
            if depth == plan.depth or not open_:
                out.nodes += nodes
                out.levels.append({"depth": depth, "nodes": len(nodes), "kept": []})
                break
            out.nodes += [n for n in nodes if n.finished]
            candidates = [nodes[i] for i in open_]
            if plan.verify:
                scores = yield from _score(plan, prefix, candidates, add, out, score_logits)
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
            out.scores = yield from _score(plan, prefix, out.nodes, add, out, score_logits)
        return out
    finally:
        for seq in created:
            engine.cancel(seq)


def _score(plan: Plan, prefix: Sequence, nodes: list[Node], add, out: TreeOutcome, score_logits: Callable):
    """Verifier scores of (partial) solutions, each a prompt-only sequence forking the node's KV
    (continue) or the problem prefix (prompt)."""
    t = time.perf_counter()
    if plan.continue_verify:
        asks = [add(Sequence(n.seq.ids + plan.continuation(n.finished), parent=n.seq, depth=n.depth,
                             keep_logits=True)) for n in nodes]
    else:
        asks = [add(Sequence(plan.prefix_ids + plan.verify_suffix(n.token_ids), parent=prefix, depth=1,
                             keep_logits=True)) for n in nodes]
    yield asks
    scores = score_logits(last_logits(asks))
    out.verify_s += time.perf_counter() - t
    return scores


def _check(seqs: list[Sequence]) -> None:
    for s in seqs:
        if s.stop_reason == "error":
            raise RkscError(s.error)
