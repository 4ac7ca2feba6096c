"""Tree of thoughts on the block pool: depth D, branching B, keep K.

Depth 1 is the ordinary solve: B branches from the problem prefix, N tokens each. At every later
depth the K best unfinished nodes (by verifier score on their partial solution, or by generation
confidence without a verifier) each fork B children. A fork shares every ancestor block (ref
counts, no copy); a child starts by feeding its parent's last token, then a short continuation
cue, then decodes N more tokens. All children of a depth decode together in one batch. Nodes that
ended are final candidates as they are; the leaves of the last depth join them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rksc.engine.decode import collect, decode
from rksc.engine.pool_runner import PoolRunner
from rksc.engine.sampler import Sampler

CUES = ("\n\nNext, ", "\n\nLet me check the last step, then continue. ", "\n\nContinuing, ", "\n\nNow, ",
        "\n\nThe next step: ", "\n\nCarefully, ", "\n\nThen, ", "\n\nSo far so good. ")


@dataclass
class Node:
    depth: int
    parent: int | None  # index of the parent in the previous depth's node list
    cues: list[str]  # the approach hint, then one continuation cue per depth
    token_ids: list[int]  # everything after the root prompt: generated tokens and cue tokens
    token_probs: list[float]  # probabilities of the generated tokens only
    finished: bool

    @property
    def confidence(self) -> float:
        return sum(self.token_probs) / len(self.token_probs) if self.token_probs else 0.0


@dataclass
class TreeOutcome:
    nodes: list[Node]  # final candidates
    prefill_s: float = 0.0
    decode_s: float = 0.0
    verify_s: float = 0.0
    kv_peak: int = 0
    prefix_bytes: int = 0
    levels: list[dict] = field(default_factory=list)  # per depth: nodes, kept indices


def grow(runner: PoolRunner, verifier, prompts, layout, suffixes, hints, config, eos) -> TreeOutcome:
    out = TreeOutcome(nodes=[])
    tok = prompts.tok
    t = time.perf_counter()
    prefix = runner.prefill(layout.prefix.ids)
    out.prefix_bytes = prefix.nbytes
    batch, logits = runner.extend(prefix, [s.ids for s in suffixes], depth=1)
    out.prefill_s += time.perf_counter() - t
    nodes = [Node(1, None, [h], [], [], False) for h in hints]
    try:
        for depth in range(1, config.depth + 1):
            t = time.perf_counter()
            traces = collect(decode(runner, batch, logits, Sampler(config.sampling, batch.rows, first_branch=depth * 1000),
                                    config.max_new_tokens, eos), batch.rows)
            out.decode_s += time.perf_counter() - t
            out.kv_peak = max(out.kv_peak, batch.kv_bytes)  # distinct blocks, the shared prefix included
            for node, trace in zip(nodes, traces):
                node.token_ids += trace.token_ids
                node.token_probs += trace.token_probs
                node.finished = trace.finished
            open_ = [i for i, n in enumerate(nodes) if not n.finished]
            if depth == config.depth or not open_:
                out.nodes += nodes
                out.levels.append({"depth": depth, "nodes": len(nodes), "kept": []})
                break
            out.nodes += [n for n in nodes if n.finished]
            t = time.perf_counter()
            candidates = [nodes[i] for i in open_]
            scores = (score(verifier, prompts, layout, suffixes, hints, candidates, config)[0] if config.verify
                      else [n.confidence for n in candidates])
            out.verify_s += time.perf_counter() - t
            kept = [i for _, i in sorted(zip(scores, open_), key=lambda p: (-p[0], p[1]))[:config.keep]]
            out.levels.append({"depth": depth, "nodes": len(nodes), "kept": kept})
            t = time.perf_counter()
            parents = [runner.fork(batch, i, depth=depth + 1) for i in kept]
            runner.release(batch)
            children, rows, row_parents = [], [], []
            for parent_prefix, i in zip(parents, kept):
                for j in range(config.branches):
                    cue = CUES[j % len(CUES)]
                    cue_ids = tok(cue, add_special_tokens=False)["input_ids"]
                    rows.append([nodes[i].token_ids[-1]] + cue_ids)
                    row_parents.append(parent_prefix)
                    children.append(Node(depth + 1, i, nodes[i].cues + [cue], nodes[i].token_ids + cue_ids,
                                         list(nodes[i].token_probs), False))
            batch, logits = runner.extend(row_parents, rows, depth=depth + 1)
            for p in parents:
                runner.release(p)
            out.prefill_s += time.perf_counter() - t
            nodes = children
    finally:
        runner.release(batch)
        runner.release(prefix)
    return out


def score(verifier, prompts, layout, suffixes, hints, nodes: list[Node], config) -> tuple[list[float], int]:
    """Verifier scores of (partial) solutions: as a continuation of each node's own KV, or with
    the separate verification prompt over the problem prefix."""
    root = dict(zip(hints, suffixes))
    if config.continue_verify:
        return verifier.score_sequences([layout.prefix.ids + root[n.cues[0]].ids + n.token_ids
                                         + prompts.continuation(n.finished) for n in nodes])
    return verifier.score_sequences([layout.prefix.ids + prompts.verify(layout, prompts.decode(n.token_ids)).ids
                                     for n in nodes])
