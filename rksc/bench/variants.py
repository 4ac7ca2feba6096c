"""Prompt variants at divergence levels, for measuring approximate KV reuse (ASKS).

Each case is a pair of chat prompts about the same real problem: the donor, computed first, and the
target, which may read the donor's KV. The problem text is kept word for word (its answer must not
change); what differs is everything around it, at five levels:

- identical: the same prompt twice (exact prefix caching already serves it);
- minor: a few words of the instruction reworded;
- structure: the instruction moved after the problem, the problem label changed;
- framing: another system prompt, persona, problem introduction and answer request;
- fewshot: the same instruction and problem after different worked examples (other problems).
"""

from __future__ import annotations

from dataclasses import dataclass

from rksc.bench.datasets import Problem

LEVELS = ("identical", "minor", "structure", "framing", "fewshot")
SYSTEM = "You are a careful problem solver. Reason step by step, then state the final answer."
FRAMING_SYSTEM = "You are a friendly tutor who helps students with homework questions."
FORMAT = {
    "number": 'End with the line "The answer is N." where N is a number.',
    "choice": 'End with the line "The answer is X." where X is the letter of the correct option.',
    "math": 'End with the line "The answer is \\boxed{X}." where X is the final answer in LaTeX.',
}
SHOTS = 2


@dataclass(frozen=True)
class Case:
    problem: Problem
    level: str
    donor: list[dict]  # chat messages
    target: list[dict]


def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _base(p: Problem, instruction: str = "Solve the following problem step by step.", shots: str = "") -> list[dict]:
    return _chat(SYSTEM, f"{instruction}\n\n{shots}Problem: {p.question}\n{FORMAT[p.kind]}")


def worked_examples(examples: list[Problem]) -> str:
    """Each problem and its worked solution (its gold answer where it has none), as few-shot text."""
    return "".join(f"Problem: {e.question}\nSolution: {e.solution or f'The answer is {e.gold}.'}\n\n"
                   for e in examples)


def case(p: Problem, level: str, examples: list[Problem]) -> Case:
    """The donor and target prompts of one level; `examples` (at least 2 * SHOTS problems other than
    `p`) give the few-shot cases their worked examples."""
    donor = _base(p)
    if level == "identical":
        target = _base(p)
    elif level == "minor":
        target = _base(p, "Solve this problem step by step, please.")
    elif level == "structure":
        target = _chat(SYSTEM, f"Question: {p.question}\n\nSolve the question above step by step. {FORMAT[p.kind]}")
    elif level == "framing":
        target = _chat(FRAMING_SYSTEM, f"A student brought me this exercise and is stuck:\n\n{p.question}\n\n"
                                       "Could you walk us through it? Finish by writing the final answer "
                                       "as \"The answer is ...\".")
    elif level == "fewshot":
        assert len(examples) >= 2 * SHOTS, "few-shot cases need 2 * SHOTS example problems"
        donor = _base(p, shots=worked_examples(examples[:SHOTS]))
        target = _base(p, shots=worked_examples(examples[SHOTS:2 * SHOTS]))
    else:
        raise ValueError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
    return Case(p, level, donor, target)


def cases(problems: list[Problem], examples: list[Problem], levels=LEVELS) -> list[Case]:
    """Every level for every problem; the few-shot examples rotate through `examples`."""
    out = []
    for i, p in enumerate(problems):
        k = (i * 2 * SHOTS) % max(len(examples) - 2 * SHOTS + 1, 1)
        shots = [e for e in examples[k:] + examples[:k] if e.id != p.id][:2 * SHOTS]
        out += [case(p, level, shots) for level in levels]
    return out
