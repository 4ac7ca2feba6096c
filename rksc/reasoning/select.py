"""Choosing one branch: majority vote, verifier score, or a verifier-weighted vote."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

METHODS = ("composite", "vote", "verifier")


@dataclass(frozen=True)
class Candidate:
    answer: str | None
    confidence: float  # mean token probability of the branch
    verifier: float | None  # P(YES) / (P(YES) + P(NO)); None when the verifier did not run


def _score(c: Candidate) -> tuple[float, float]:
    return (c.verifier if c.verifier is not None else c.confidence, c.confidence)


def select(cands: list[Candidate], method: str) -> int:
    """Index of the chosen branch. Branches with an answer win over branches without one.

    vote: most frequent answer; ties go to the answer with the higher summed score.
    verifier: the single branch with the highest verifier score (confidence if it did not run).
    composite: answers ranked by the sum of their branches' verifier scores, i.e. a vote where
    each branch counts by how much the verifier believes it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method '{method}'; choose one of {', '.join(METHODS)}")
    if not cands:
        raise ValueError("no candidates to select from")
    pool = [i for i, c in enumerate(cands) if c.answer is not None] or list(range(len(cands)))
    best_in = lambda idx: max(idx, key=lambda i: (_score(cands[i]), -i))  # noqa: E731
    if method == "verifier" or all(cands[i].answer is None for i in pool):
        return best_in(pool)
    groups: dict[str, list[int]] = defaultdict(list)
    for i in pool:
        groups[cands[i].answer].append(i)

    def rank(members: list[int]) -> tuple:
        total = sum(_score(cands[i])[0] for i in members)
        first = min(members)  # deterministic final tie-break: the earliest branch
        return (len(members), total, -first) if method == "vote" else (total, len(members), -first)

    return best_in(max(groups.values(), key=rank))
