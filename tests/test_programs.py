"""The reasoning programs (rksc.reasoning.tree, rksc.reasoning.solver) against a scripted fake engine.

`ScriptedEngine` implements rksc.engine.api's `EngineAPI` and nothing else: no model, no runner, no
pool, no scheduler. Any other attribute a program reads raises AttributeError (and is logged), so
every test here passing shows that the programs need nothing beyond the protocol.

What the fake does with a sequence, step by step (one step advances every live sequence once):
- `add`: the sequence is RUNNING; a fork (`parent`) must extend a held, unreleased parent's tokens
  and waits until the parent finished, as on the local engine;
- its first step is its prompt: a prompt-only sequence ends "prefilled" (a verifier question with
  `keep_logits` gets [V] logits whose softmax gives P(YES) = the scripted verdict); a generating one
  gets its reply from the script (a function of its prompt ids) and its first token;
- every later step gives it its next scripted token (each with the reply's probability) until an
  end token ("finished"), `max_tokens` ("length"), or the reply's scripted error ("error");
- `cancel`/`release` end or free sequences; a held sequence holds its KV until released (or
  cancelled) and every child that was waiting to fork it has forked it or was cancelled.
The tests read what happened from the `Scripted` state, which a program never sees.

The tokenizer is SmolLM2's (rksc.models.loader.load_tokenizer, no weights), so prompts, cues,
verifier questions and answer extraction are the real ones.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import torch

from rksc.engine.api import EngineAPI, EngineStats
from rksc.engine.prompts import HINTS
from rksc.engine.sequence import Sequence, Status
from rksc.errors import RkscError
from rksc.reasoning import early, tree

# ---- the fake engine ----------------------------------------------------------------------------------

# the protocol's members, read from the protocol itself: the fake exposes exactly these
PROTOCOL = frozenset({n for n in vars(EngineAPI) if not n.startswith("_")} | set(EngineAPI.__annotations__))
BYTES_PER_TOKEN = 4  # the fake's KV: 4 bytes per token held (a fork shares its parent's tokens)
BLOCK_BYTES = 64


@dataclass
class Reply:
    """A generating sequence's script: its tokens, each with probability `prob`; with `error`, the
    sequence ends with that error after its tokens instead."""

    tokens: list[int]
    prob: float = 0.9
    conf: float = 5.0
    error: str | None = None


class Scripted:
    """The fake's state and logic: what the tests see (the program sees `ScriptedEngine`)."""

    def __init__(self, write: Callable[[list[int]], Reply], judge: Callable[[list[int]], float] | None,
                 yes: int, no: int, vocab: int):
        self.write, self.judge, self.yes, self.no, self.vocab = write, judge, yes, no, vocab
        self.stats = EngineStats()
        self.added: list[Sequence] = []
        self.live: list[Sequence] = []  # unfinished, in the order they were added
        self.holding: set[int] = set()  # ids of sequences whose KV is held (running past their prompt, or held)
        self.released: set[int] = set()
        self.pending: Counter[int] = Counter()  # parent id -> children waiting to fork it
        self.replies: dict[int, Reply] = {}
        self.forks: dict[int, Sequence] = {}  # child id -> the parent whose KV it forked
        self.added_at: dict[int, int] = {}  # id -> engine step when added
        self.finished_at: dict[int, int] = {}  # id -> engine step when it ended
        self.freed_at: dict[int, int] = {}  # id -> engine step after which its KV went back
        self.cancelled_live: list[Sequence] = []  # cancelled before they ended by themselves
        self.refused: list[str] = []  # attributes outside the protocol a program asked for
        self.closed = False

    # -- the protocol --
    def add(self, seq: Sequence) -> Sequence:
        if seq.options.asks is not None or seq.options.layer_exit is not None:
            raise RkscError("the scripted engine has no KV to reuse approximately and no logit lens")
        if seq.options.keep_logits and self.judge is None:
            raise RkscError("the scripted engine has no verifier script")
        assert seq.status is Status.WAITING and not any(s is seq for s in self.added), f"added twice: {seq.id}"
        parent = seq.parent
        if parent is not None:
            assert self._known(parent), "fork of a sequence this engine never ran"
            assert parent.hold and parent.id not in self.released, "fork of a sequence that does not hold its KV"
            self.pending[parent.id] += 1
        seq.status = Status.RUNNING
        self.added.append(seq)
        self.live.append(seq)
        self.added_at[seq.id] = self.stats.steps
        return seq

    def cancel(self, seq: Sequence) -> None:
        # as the local Engine (whose scheduler cannot remove what it never queued): not for strangers
        assert self._known(seq), f"cancel of a sequence this engine never accepted: {seq.id}"
        if seq.finished:
            self.release(seq)
            return
        if not seq.book.prefilled and seq.parent is not None:  # it will never fork its parent
            self.pending[seq.parent.id] -= 1
            self._maybe_free(seq.parent)
        self.cancelled_live.append(seq)
        self._finish(seq, "cancelled")

    def release(self, seq: Sequence) -> None:
        assert self._known(seq), f"release of a sequence this engine never accepted: {seq.id}"
        self.released.add(seq.id)
        self._maybe_free(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.live)

    def step(self) -> list[Sequence]:
        if not self.live:
            return []
        self.stats.steps += 1
        now, touched = time.perf_counter(), []
        for seq in list(self.live):
            if not seq.book.prefilled:
                if seq.parent is not None and not seq.parent.finished:
                    continue  # forks once its parent has run
                self._prefill(seq, now)
                if seq.max_tokens == 0:
                    touched.append(seq)
                    continue
            seq.book.last_step = self.stats.steps
            self._next_token(seq)
            touched.append(seq)
        return touched

    def kv_bytes(self, seqs: Iterable[Sequence]) -> int:
        held = {s.id: s for s in seqs if s.id in self.holding}
        own = sum(s.num_tokens - (len(s.parent.ids) if s.parent is not None and s.parent.id in held else 0)
                  for s in held.values())
        return BYTES_PER_TOKEN * own

    def block_bytes(self) -> int:
        return BLOCK_BYTES

    def drop_cached(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    # -- the script --
    def _prefill(self, seq: Sequence, now: float) -> None:
        parent = seq.parent
        if parent is not None:
            assert seq.prompt_ids[:len(parent.ids)] == parent.ids, "a fork must extend its parent's tokens"
            assert len(seq.prompt_ids) > len(parent.ids), "a fork must add at least one token"
            assert parent.id in self.holding, f"{seq.id} forks {parent.id}, whose KV is gone"
            self.forks[seq.id] = parent
            self.pending[parent.id] -= 1
            self._maybe_free(parent)
        seq.book.prefilled, seq.out.prefilled_at = True, now
        seq.book.last_step = self.stats.steps
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += len(seq.prompt_ids) - (len(parent.ids) if parent is not None else 0)
        self.holding.add(seq.id)
        if seq.max_tokens == 0:
            if seq.options.keep_logits:
                seq.out.logits = self._logits(self.judge(seq.prompt_ids))
            self._finish(seq, "prefilled")
        else:
            self.replies[seq.id] = self.write(seq.prompt_ids)

    def _logits(self, p_yes: float) -> torch.Tensor:
        """Logits whose softmax puts p_yes on a YES token and 1 - p_yes on a NO token."""
        assert 0.0 < p_yes < 1.0, p_yes
        logits = torch.full((self.vocab,), -math.inf)
        logits[self.yes], logits[self.no] = math.log(p_yes), math.log1p(-p_yes)
        return logits

    def _next_token(self, seq: Sequence) -> None:
        reply = self.replies[seq.id]
        n = len(seq.token_ids)
        if n == len(reply.tokens):
            assert reply.error is not None, "the script ran out before an end token or the token cap"
            self._finish(seq, "error", reply.error)
            return
        token = reply.tokens[n]
        seq.token_ids.append(token)
        seq.out.token_probs.append(reply.prob)
        if seq.options.confidence:
            seq.out.token_confs.append(reply.conf)
        self.stats.sampled += 1
        self.stats.decode_steps += n > 0
        if token in seq.stop_ids:
            self._finish(seq, "finished")
        elif len(seq.token_ids) >= seq.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.status, seq.stop_reason, seq.out.error = Status.FINISHED, reason, error
        self.live.remove(seq)
        self.finished_at[seq.id] = self.stats.steps
        if not seq.hold or reason in ("cancelled", "error"):
            self._free(seq)
        else:
            self._maybe_free(seq)

    def _maybe_free(self, seq: Sequence) -> None:
        if seq.id in self.released and self.pending[seq.id] == 0 and seq.finished:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.id in self.holding:
            self.holding.discard(seq.id)
            self.freed_at[seq.id] = self.stats.steps

    def _known(self, seq: Sequence) -> bool:
        return any(s is seq for s in self.added)

    # -- for the tests --
    def assert_clean(self) -> None:
        """After the programs: every sequence ended, no KV held, nothing asked beyond the protocol."""
        assert not self.refused, f"programs asked the engine for {self.refused}"
        assert not self.live, [s.id for s in self.live]
        assert all(s.finished for s in self.added)
        assert not self.holding, f"still held: {sorted(self.holding)}"
        assert not +self.pending, f"children never forked: {dict(+self.pending)}"

    def root(self, seq: Sequence) -> Sequence:
        while seq.parent is not None:
            seq = seq.parent
        return seq


def _state(engine: ScriptedEngine) -> Scripted:
    return object.__getattribute__(engine, "_state")


class ScriptedEngine:
    """`EngineAPI` over a `Scripted` state, and nothing else: any other attribute raises."""

    __slots__ = ("_state",)

    def __init__(self, state: Scripted):
        object.__setattr__(self, "_state", state)

    def __getattribute__(self, name: str):
        if name in PROTOCOL or (name.startswith("__") and name.endswith("__")):
            return object.__getattribute__(self, name)
        _state(self).refused.append(name)
        raise AttributeError(f"engine.{name}: programs may use only the engine interface "
                             f"(rksc.engine.api.EngineAPI: {', '.join(sorted(PROTOCOL))})")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"engine.{name} = ...: programs may not set attributes on the engine")

    @property
    def stats(self) -> EngineStats:
        return _state(self).stats

    def add(self, seq: Sequence) -> Sequence:
        return _state(self).add(seq)

    def cancel(self, seq: Sequence) -> None:
        _state(self).cancel(seq)

    def release(self, seq: Sequence) -> None:
        _state(self).release(seq)

    @property
    def has_work(self) -> bool:
        return _state(self).has_work

    def step(self) -> list[Sequence]:
        return _state(self).step()

    def kv_bytes(self, seqs: Iterable[Sequence]) -> int | None:
        return _state(self).kv_bytes(seqs)

    def block_bytes(self) -> int | None:
        return _state(self).block_bytes()

    def drop_cached(self) -> int:
        return _state(self).drop_cached()

    def close(self) -> None:
        _state(self).close()


def test_the_fake_is_the_protocol_and_nothing_more():
    state = Scripted(lambda ids: Reply([1]), None, yes=1, no=2, vocab=8)
    engine = ScriptedEngine(state)
    assert isinstance(engine, EngineAPI)
    assert PROTOCOL == {"stats", "add", "cancel", "release", "has_work", "step", "kv_bytes", "block_bytes",
                        "drop_cached", "close"}
    assert {n for n in dir(ScriptedEngine) if not n.startswith("_")} == PROTOCOL
    for name in ("runner", "pool", "scheduler", "model", "run", "eos", "lens", "check", "_state"):
        with pytest.raises(AttributeError, match=rf"engine\.{name}: programs may use only the engine interface"):
            getattr(engine, name)
    assert not hasattr(engine, "runner")  # getattr with a default cannot get past it either ...
    assert state.refused == ["runner", "pool", "scheduler", "model", "run", "eos", "lens", "check", "_state",
                             "runner"]  # ... and every attempt is logged, so assert_clean catches it
    with pytest.raises(AttributeError):
        engine.stats = EngineStats()
    # and it runs sequences: one token per step, a prompt-only one ends at its first step
    a = engine.add(Sequence([5, 6], max_tokens=3, stop_ids=frozenset({1})))
    b = engine.add(Sequence([5], hold=True))
    assert engine.has_work and engine.step() == [a, b]
    assert (a.token_ids, a.stop_reason, b.stop_reason) == ([1], "finished", "prefilled")
    assert engine.kv_bytes([a, b]) == BYTES_PER_TOKEN * 1 and not engine.has_work
    with pytest.raises(AssertionError, match="never accepted"):
        engine.cancel(Sequence([1]))
    engine.release(b)
    state.refused.clear()
    state.assert_clean()


# ---- scripts written with the real tokenizer ---------------------------------------------------------

slow = pytest.mark.slow  # the tests below use SmolLM2's tokenizer (its package is prepared once per machine)

QUESTION = "What is 2 + 2?"
BOXED = re.compile(r"\\boxed\{(\d+)\}")


@pytest.fixture(scope="module")
def lm():
    from rksc.models.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


class Kit:
    """Scripts and solvers on the fake for one tokenizer."""

    def __init__(self, lm):
        from rksc.engine.verifier import word_token_ids

        self.lm, self.tok = lm, lm.tokenizer
        self.yes, self.no = word_token_ids(self.tok, "yes")[0], word_token_ids(self.tok, "no")[0]

    def reply(self, text: str, prob: float = 0.9, end: bool = True, error: str | None = None) -> Reply:
        ids = self.tok.encode(text, add_special_tokens=False)
        return Reply(ids + ([self.tok.eos_token_id] if end else []), prob, error=error)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def solver(self, write: Callable[[str], Reply], judge: Callable[[str], float] | None = None):
        """A Solver on a fresh fake whose script reads prompts as text; returns (solver, state)."""
        from rksc.reasoning.solver import Solver

        state = Scripted(lambda ids: write(self.decode(ids)),
                         None if judge is None else (lambda ids: judge(self.decode(ids))),
                         self.yes, self.no, len(self.tok))
        engine = ScriptedEngine(state)
        assert isinstance(engine, EngineAPI)
        solver = Solver(self.lm, engine=engine)
        return solver, state


@pytest.fixture(scope="module")
def kit(lm):
    return Kit(lm)


def hint_of(text: str) -> int:
    """The root branch a prompt descends from: the index of the approach hint it carries."""
    found = [i for i, h in enumerate(HINTS) if h in text]
    assert len(found) == 1, found
    return found[0]


def last_boxed(text: str) -> str | None:
    found = BOXED.findall(text)
    return found[-1] if found else None


def config(**kw):
    from rksc.reasoning.solver import SolveConfig

    return SolveConfig(**{"branches": 5, "max_new_tokens": 48, "verify": False, **kw})


ANSWERS = ["4", "5", "4", "5", "4"]  # the best-of-N script: 3 branches say 4, 2 say 5


def best_of_n_text(i: int) -> str:
    return f"Branch {i} adds the numbers. The answer is \\boxed{{{ANSWERS[i]}}}."


# ---- best-of-N ---------------------------------------------------------------------------------------

@slow
def test_best_of_n_votes_the_majority_answer(kit):
    replies = [kit.reply(best_of_n_text(i)) for i in range(5)]
    solver, state = kit.solver(lambda text: replies[hint_of(text)])
    result = solver.solve(QUESTION, config(select="vote"))
    assert result.answer == "4" and result.kind == "number"
    assert len(result.branches) == 5
    assert [b.answer for b in result.branches] == ANSWERS
    assert [b.text for b in result.branches] == [best_of_n_text(i) for i in range(5)]
    assert [b.stop_reason for b in result.branches] == ["finished"] * 5 and all(b.finished for b in result.branches)
    assert [b.token_ids for b in result.branches] == [r.tokens for r in replies]
    assert result.branches[result.chosen].answer == "4"
    scripted = sum(len(r.tokens) for r in replies)
    assert result.timing.new_tokens == scripted == state.stats.sampled
    assert all(b.verifier is None for b in result.branches)
    # one held prefix, five forks of it, the prefix's KV counted once
    prefix = state.added[0]
    assert prefix.hold and len(state.added) == 6
    assert all(state.forks[s.id] is prefix for s in state.added[1:])
    assert result.prefix_tokens == len(prefix.prompt_ids)
    assert result.kv_bytes["prefix"] == BYTES_PER_TOKEN * len(prefix.prompt_ids)
    assert result.kv_bytes["decode_peak"] == BYTES_PER_TOKEN * (
        len(prefix.prompt_ids) + sum(s.num_tokens - len(prefix.ids) for s in state.added[1:]))
    state.assert_clean()
    solver.close()
    assert state.closed


@slow
@pytest.mark.parametrize("verifier", ["continue", "prompt"])
@pytest.mark.parametrize("select, winner", [("vote", "4"), ("composite", "5"), ("verifier", "5")])
def test_the_verifier_scores_decide_the_answer(kit, verifier, select, winner):
    """The minority answer 5 is the one the verifier believes (0.9 against 0.1): a verifier-weighted
    selection picks it, a plain vote does not."""
    verdict = {"4": 0.1, "5": 0.9}
    questions = []

    def judge(text):
        questions.append(text)
        assert "Is this solution correct?" in text
        return verdict[last_boxed(text)]

    replies = [kit.reply(best_of_n_text(i)) for i in range(5)]
    solver, state = kit.solver(lambda text: replies[hint_of(text)], judge)
    result = solver.solve(QUESTION, config(select=select, verify=True, verifier=verifier))
    assert result.answer == winner
    assert [b.verifier for b in result.branches] == pytest.approx([verdict[a] for a in ANSWERS])
    if select == "verifier":
        assert result.chosen == 1  # the first of the best-scored branches
    assert len(questions) == 5
    prefix, branches = state.added[0], state.added[1:6]
    asks = state.added[6:]
    assert len(asks) == 5 and all(a.options.keep_logits and a.max_tokens == 0 for a in asks)
    # continue: each question forks its branch's own KV; prompt: the problem prefix, the solution written out
    parents = branches if verifier == "continue" else [prefix] * 5
    assert [state.forks[a.id] for a in asks] == parents
    if verifier == "prompt":
        assert all(f"Proposed solution:\n{best_of_n_text(i)}" in q for i, q in enumerate(questions))
    state.assert_clean()


# ---- trees -------------------------------------------------------------------------------------------

ROOT_WORDS = ["alpha", "beta", "gamma"]  # root branch i writes about ROOT_WORDS[i] and does not finish
ROOT_PROBS = [0.5, 0.9, 0.7]  # the roots' token probabilities: their confidences
LEAF_ANSWER = {"alpha": "1", "beta": "2", "gamma": "3"}  # every child of a root gives its root's answer


def tree_script(kit):
    def write(text):
        words = [w for w in ROOT_WORDS if f"{w} {w}" in text]
        if not words:  # a root
            i = hint_of(text)
            return kit.reply(f"Thinking with {ROOT_WORDS[i]}: " + f"{ROOT_WORDS[i]} " * 40, ROOT_PROBS[i], end=False)
        word, = words
        cue = [j for j, c in enumerate(tree.CUES) if text.endswith(c)]
        assert len(cue) == 1, "a child's prompt ends with its continuation cue"
        return kit.reply(f"so the answer is \\boxed{{{LEAF_ANSWER[word]}}}.", 0.8)
    return write


@slow
@pytest.mark.parametrize("verify", [False, True])
def test_a_tree_keeps_the_best_nodes_and_forks_them(kit, verify):
    """Depth 2, keep 2 of 3 roots: by confidence (beta 0.9, gamma 0.7 over alpha 0.5), or by the
    prompt verifier's scores of the partial solutions (alpha 0.95, gamma 0.6 over beta 0.1); the
    kept roots' children give their roots' answers, so the kept roots decide the answer."""
    partial = {"alpha": 0.95, "beta": 0.1, "gamma": 0.6}
    final = {"1": 0.8, "2": 0.5, "3": 0.3}

    def judge(text):
        answer = last_boxed(text)
        if answer is not None:
            return final[answer]
        word, = [w for w in ROOT_WORDS if f"{w} {w}" in text]
        return partial[word]

    solver, state = kit.solver(tree_script(kit), judge)
    result = solver.solve(QUESTION, config(branches=3, depth=2, keep=2, max_new_tokens=16, verify=verify,
                                           verifier="prompt"))
    kept = [0, 2] if verify else [1, 2]
    assert result.tree == [{"depth": 1, "nodes": 3, "kept": kept}, {"depth": 2, "nodes": 6, "kept": []}]
    assert result.answer == ("1" if verify else "2")  # composite: 3 x 0.8 over 3 x 0.3; no verifier: confidence
    assert [b.depth for b in result.branches] == [2] * 6
    assert [b.parent for b in result.branches] == [kept[0]] * 3 + [kept[1]] * 3
    assert [b.answer for b in result.branches] == [LEAF_ANSWER[ROOT_WORDS[k]] for k in kept for _ in range(3)]
    assert [b.hint.split(" | ") for b in result.branches] == [
        [HINTS[k], tree.CUES[j].strip()] for k in kept for j in range(3)]  # the approach hint, then the cue

    prefix = state.added[0]
    roots = [s for s in state.added if state.forks.get(s.id) is prefix and s.max_tokens > 0]
    children = [s for s in state.added if s.max_tokens > 0 and state.forks.get(s.id) in roots]
    assert len(roots) == 3 and [r.stop_reason for r in roots] == ["length"] * 3
    assert len(children) == 6
    # every child forks a kept root: the first three the best one, the others the second
    assert [state.forks[c.id] for c in children] == [roots[kept[0]]] * 3 + [roots[kept[1]]] * 3
    assert [b.token_ids for b in result.branches] == [
        roots[kept[i // 3]].token_ids + kit.tok(tree.CUES[i % 3], add_special_tokens=False)["input_ids"]
        + children[i].token_ids for i in range(6)]
    asks = [s for s in state.added if s.options.keep_logits]
    assert len(asks) == (3 + 6 if verify else 0)  # the roots' partial solutions, then the leaves
    assert all(state.forks[a.id] is prefix for a in asks)  # the prompt verifier forks the problem prefix
    if verify:
        assert [b.verifier for b in result.branches] == pytest.approx(
            [final[LEAF_ANSWER[ROOT_WORDS[k]]] for k in kept for _ in range(3)])
    # the roots' KV went back once their children had forked them (the unkept one's at once), before
    # the leaves ended; the leaves' KV at the end: nothing is left live or held
    assert max(state.freed_at[r.id] for r in roots) < max(state.finished_at[c.id] for c in children)
    state.assert_clean()


# ---- early exit --------------------------------------------------------------------------------------

def early_script(kit):
    """Branches 0, 2, 4 say 4 at once; 1 and 3 ramble for 100 tokens before saying 5."""
    def write(text):
        i = hint_of(text)
        if ANSWERS[i] == "4":
            return kit.reply(best_of_n_text(i))
        return kit.reply("Let me think. " + "Hmm, " * 100 + best_of_n_text(i))
    return write


@slow
@pytest.mark.parametrize("select, verify", [("vote", False), ("vote", True), ("composite", True)])
def test_early_exit_cancels_the_branches_once_the_answer_is_settled(kit, select, verify):
    """`exact`: once three of five branches say 4 (vote: 3 > 0 + 2 live; composite, each verified as
    it ends at 0.9: 2.7 > 0 + 2), the two live branches are cancelled at once, long before their
    script ends (with a vote the verifier then runs on the three candidates only)."""
    write = early_script(kit)
    solver, state = kit.solver(write, lambda text: 0.9)
    result = solver.solve(QUESTION, config(select=select, verify=verify, max_new_tokens=256,
                                           early_stop=("exact",), thresholds=early.Thresholds()))
    incremental = verify and select != "vote"  # each branch is verified as soon as it ends
    assert result.answer == "4"
    assert [b.stop_reason for b in result.branches] == ["finished", "consensus", "finished", "consensus",
                                                       "finished"]
    short, long = [state.added[i] for i in (1, 3, 5)], [state.added[i] for i in (2, 4)]
    asks = [s for s in state.added if s.options.keep_logits]
    assert len(asks) == (3 if verify else 0)  # the consensus-stopped branches are never verified
    assert [state.forks[a.id] for a in asks] == short[:len(asks)]
    # cancelled at the step that settled the answer: the last short branch's end, or its verdict
    settled = max(state.finished_at[s.id] for s in short + (asks if incremental else []))
    assert state.cancelled_live == long and all(state.finished_at[s.id] == settled for s in long)
    assert all(0 < len(s.token_ids) < 100 for s in long)
    scripted = sum(len(write(hint_text).tokens) for hint_text in HINTS[:5])
    assert result.timing.new_tokens == state.stats.sampled < scripted
    assert result.early["fired"] == [{"policy": "exact", "reason": "consensus", "branches": [1, 3],
                                      "tokens": len(long[0].token_ids)}]
    assert result.early["verified_incrementally"] is incremental
    scores = [None if b.verifier is None else round(b.verifier, 6) for b in result.branches]
    assert scores == ([0.9, None, 0.9, None, 0.9] if verify else [None] * 5)
    state.assert_clean()


# ---- many problems -----------------------------------------------------------------------------------

PROBLEMS = {"What is 1 + 1?": "2", "What is 2 + 3?": "5", "What is 3 + 3?": "6", "What is 4 + 4?": "8"}


def question_of(text: str) -> str:
    found = [q for q in PROBLEMS if q in text]
    assert len(found) == 1, found
    return found[0]


@slow
def test_a_sequence_error_fails_its_problem_and_the_others_go_on(kit):
    def write(text):
        q = question_of(text)
        if q == "What is 2 + 3?" and hint_of(text) == 1:  # a few tokens, then the request dies
            return kit.reply("Let me", end=False, error="scripted: connection reset by peer")
        return kit.reply(f"The answer is {PROBLEMS[q]}.")

    questions = list(PROBLEMS)[:3]
    solver, state = kit.solver(write)
    results = list(solver.solve_many(questions, config(), concurrency=3))
    assert [i for i, _ in results] == [0, 1, 2]
    assert isinstance(results[1][1], RkscError) and "connection reset by peer" in str(results[1][1])
    assert [results[0][1].answer, results[2][1].answer] == ["2", "6"]
    assert [r.question for _, r in (results[0], results[2])] == [questions[0], questions[2]]
    failed = [s for s in state.added if question_of(kit.decode(s.prompt_ids)) == questions[1]]
    assert Counter(s.stop_reason for s in failed[1:]) == {"error": 1, "finished": 4}  # its depth waits for all
    state.assert_clean()

    solver, state = kit.solver(write)  # alone, the same problem raises its error
    with pytest.raises(RkscError, match="connection reset by peer"):
        solver.solve(questions[1], config())
    state.assert_clean()


@slow
def test_solve_many_keeps_two_problems_in_flight_and_yields_in_input_order(kit):
    """Problem 0 writes long branches, the others short ones: problems 1 and 2 end first, but come
    out after problem 0."""
    def write(text):
        q = question_of(text)
        pad = "Let me see. " * (30 if q == "What is 1 + 1?" else 1)
        return kit.reply(f"{pad}The answer is {PROBLEMS[q]}.")

    solver, state = kit.solver(write)
    results = list(solver.solve_many(list(PROBLEMS), config(branches=3, max_new_tokens=128), concurrency=2))
    assert [i for i, _ in results] == [0, 1, 2, 3]
    assert [r.answer for _, r in results] == list(PROBLEMS.values())
    assert [r.question for _, r in results] == list(PROBLEMS)
    spans = {}  # question -> (step its prefix was added, step its last sequence ended)
    for s in state.added:
        q = question_of(kit.decode(state.root(s).prompt_ids))
        start, end = spans.get(q, (math.inf, -1))
        spans[q] = (min(start, state.added_at[s.id]), max(end, state.finished_at[s.id]))
    first, second, third, _ = (spans[q] for q in PROBLEMS)
    assert second[1] < first[1] and third[1] < first[1]  # ended before problem 0 ...
    in_flight = [sum(a < step <= b for a, b in spans.values()) for step in range(1, state.stats.steps + 1)]
    assert max(in_flight) == 2  # ... while sharing steps with it, never more than two at once
    state.assert_clean()


# ---- gaps the strict fake found (fixed) ---------------------------------------------------------

@slow
def test_a_sequence_the_engine_refuses_fails_the_problem_with_the_engines_message(kit):
    solver, state = kit.solver(lambda text: kit.reply("The answer is 4."))
    with pytest.raises(RkscError, match="no KV to reuse approximately"):
        solver.solve(QUESTION, config(asks="on", asks_tau=0.5))


@slow
def test_a_trees_new_tokens_are_the_tokens_it_generated(kit):
    solver, state = kit.solver(tree_script(kit))
    result = solver.solve(QUESTION, config(branches=3, depth=2, keep=2, max_new_tokens=16))
    assert result.timing.new_tokens == state.stats.sampled
