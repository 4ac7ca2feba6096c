"""Workloads for `rksc bench --workload`: how each branch's prompt is written around the problem.

Approximate KV reuse (ASKS) pays where branches, or problems, read much the same text at other
positions or after a small change, which exact prefix caching cannot share. Each workload keeps the
problem word for word (its answer must not change) and varies what comes before it:

| workload | every branch reads | what exact prefix caching shares |
|---|---|---|
| standard | one problem prefix, an approach hint after it | the whole prefix |
| diverse | its own instruction, then the problem | the chat template's head |
| fewshot | 3 worked examples, a window sliding one example per branch over a pool of 8 | the head |
| rag | the same 4 reference passages (similar solved problems), in its own order | the head |
| chat-edit | an earlier turn (another problem and its solution), then the problem; the earlier question was edited (one number changed, a different one per branch) | up to the edit |

Examples, passages and earlier turns come from GSM8K test problems POOL (1000-1015), which no
evaluation (from 0) or calibration split (1019-1318) uses.
"""

from __future__ import annotations

import re

from rksc.bench.datasets import Problem, load_problems
from rksc.bench.variants import worked_examples

WORKLOADS = ("standard", "diverse", "fewshot", "rag", "chat-edit")
CONTEXTS = ("fewshot", "rag", "chat-edit")  # the workloads that give each branch its own context
POOL = (1000, 16)  # offset and count of the GSM8K problems the contexts are made of
SHOTS, WINDOW, PASSAGES = 3, 8, 4
ORDERS = ((0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2), (3, 2, 1, 0), (0, 3, 2, 1), (1, 0, 3, 2),
          (2, 1, 0, 3))  # the passages' order in branch i: ORDERS[i % 8]
_NUMBER = re.compile(r"\d+")


def pool() -> list[Problem]:
    return load_problems("gsm8k", *POOL)


def contexts(workload: str, index: int, branches: int, examples: list[Problem]) -> list[dict] | None:
    """The per-branch contexts (Solver's BranchContext as dicts) of problem `index` under `workload`;
    None where the branches share one prefix (standard, diverse). Which examples a problem gets
    depends on its index, so problems differ from each other as well."""
    if workload not in CONTEXTS:
        return None
    n = len(examples)
    if workload == "fewshot":
        start = index * SHOTS
        return [{"history": [], "preamble": _examples([examples[(start + i % WINDOW + j) % n] for j in range(SHOTS)])}
                for i in range(branches)]
    if workload == "rag":
        chosen = [examples[(index * PASSAGES + j) % n] for j in range(PASSAGES)]
        return [{"history": [], "preamble": _passages([chosen[k] for k in ORDERS[i % len(ORDERS)]])}
                for i in range(branches)]
    earlier = examples[index % n]
    return [{"history": [{"role": "user", "content": edit(earlier.question, i)},
                         {"role": "assistant", "content": earlier.solution}], "preamble": ""}
            for i in range(branches)]


def edit(question: str, i: int) -> str:
    """`question` with its first number raised by `i` (i = 0: unchanged): an earlier turn edited."""
    if i == 0:
        return question
    m = _NUMBER.search(question)
    if m is None:
        return f"{question} (version {i + 1})"
    return f"{question[:m.start()]}{int(m.group()) + i}{question[m.end():]}"


def _examples(shots: list[Problem]) -> str:
    return f"Here are some worked examples.\n\n{worked_examples(shots)}Now solve the next problem the same way.\n\n"


def _passages(chosen: list[Problem]) -> str:
    body = "".join(f"[{k + 1}] {p.question} {p.solution}\n\n" for k, p in enumerate(chosen))
    return f"Reference passages (similar solved problems):\n\n{body}Use them if they help.\n\n"
