"""Prompt layout: one shared problem prefix, then per-branch and per-verification suffixes.

Every prompt the model sees is `prefix + suffix` as token ids, where the prefix (system text and
the problem) is identical for all generation branches and for the verifier, so its KV is
computed once. With a chat template the user turn is split at a marker: the prefix ends inside
the user message right after the problem, and each suffix finishes that message (a branch's
approach hint, or the verifier's question) and opens the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from rksc.errors import RkscError

SYSTEM = "You are a careful problem solver. Reason step by step, then state the final answer."
HINTS = (
    "Solve it step by step.",
    "Break the problem into smaller parts and solve each part.",
    "First list the known quantities, then compute the result.",
    "Set up an equation and solve it.",
    "Work carefully and double-check every calculation.",
    "Think about what the question asks, then work toward it.",
    "Reason briefly and directly.",
    "Make a short plan first, then follow it.",
)
PLAIN_HINT = "Solve it step by step."
# the `diverse` layout: a different instruction before the problem in every branch (a known way to
# diversify self-consistency); exact prefix caching then shares only the chat template's head
INSTRUCTIONS = (
    "You are a patient math teacher. Explain every step so that a student can follow it.",
    "Act as an accountant: track each quantity and its unit carefully before combining them.",
    "Read the problem twice, write down what is given and what is asked, then solve it.",
    "Translate the problem into equations first, then solve the equations one by one.",
    "Work backwards from what the question asks to the facts you are given.",
    "Estimate the answer roughly first, then compute it exactly and compare.",
    "Solve the problem in as few steps as you can, stating each calculation.",
    "Imagine explaining this to a friend: describe the situation, then do the arithmetic.",
)
FORMAT = {
    "number": 'End with the line "The answer is N." where N is a number.',
    "choice": 'End with the line "The answer is X." where X is the letter of the correct option.',
    "math": 'End with the line "The answer is \\boxed{X}." where X is the final answer in LaTeX.',
}
VERIFY_QUESTION = "Is this solution correct? Answer YES or NO."
_MARK = "\u2063RKSC-SPLIT\u2063"


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


@dataclass(frozen=True)
class BranchContext:
    """What one branch reads before its problem: earlier chat turns (`history`, user and assistant
    messages), then `preamble` opening the problem's own message (worked examples, passages)."""
    history: tuple[dict, ...] = ()
    preamble: str = ""


@dataclass(frozen=True)
class Layout:
    prefix: Prompt  # shared by every branch and verification of one problem
    tail: str  # closes the user turn and opens the assistant turn
    problem: str = ""  # diverse layout: the problem text each branch suffix carries (not in the prefix)


class PromptBuilder:
    def __init__(self, tokenizer, use_chat_template: bool | None = None):
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if use_chat_template is None else use_chat_template
        self._continuations: dict[bool, list[int]] = {}

    def layout(self, question: str, context: str = "") -> Layout:
        """`context` goes before the problem inside the shared prefix (the benchmark's filler)."""
        user_head = f"{context}Problem: {question.strip()}\n"
        if self.chat:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": user_head + _MARK}]
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            head, tail = text.split(_MARK)
        else:
            head, tail = user_head, "\n"
        return Layout(Prompt(head, self._encode(head, first=True)), tail)

    def diverse_layout(self, question: str, context: str = "") -> Layout:
        """The prefix ends where the user message begins; each branch writes its own instruction
        and then the problem (`branch` with a diverse layout)."""
        problem = f"{context}Problem: {question.strip()}\n"
        if self.chat:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _MARK}]
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            head, tail = text.split(_MARK)
        else:
            head, tail = "", "\n"
        if not head:  # a prompt starts with at least one shared token
            head, problem = problem[:1], problem[1:]
        return Layout(Prompt(head, self._encode(head, first=True)), tail, problem)

    def branch_prompts(self, question: str, contexts: list[BranchContext], hints: list[str],
                       kind: str) -> tuple[Layout, list[Prompt]]:
        """Each branch's whole prompt from its own context (system, history, preamble, the problem, its
        hint), tokenized whole; the shared prefix is the longest run of leading token ids every branch
        has (at least one, and every branch keeps at least one of its own), so prefix + suffix is
        exactly each branch's prompt. The layout's `problem` lets a separate verifier prompt restate it."""
        problem = f"Problem: {question.strip()}\n"
        texts = []
        for context, hint in zip(contexts, hints):
            user = f"{context.preamble}{problem}{hint} {FORMAT[kind]}"
            if self.chat:
                messages = [{"role": "system", "content": SYSTEM}, *context.history, {"role": "user", "content": user}]
                texts.append(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            else:
                earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in context.history)
                texts.append(f"{earlier}{user}\nSolution:")
        ids = [self._encode(text, first=True) for text in texts]
        shared = min(len(i) for i in ids) - 1
        for n in range(shared):
            if any(i[n] != ids[0][n] for i in ids):
                shared = n
                break
        if shared == 0:
            raise RkscError("the branches' prompts do not share even their first token")
        prefix = Prompt(self.tok.decode(ids[0][:shared]), ids[0][:shared])
        suffixes = [Prompt(self.tok.decode(i[shared:]), i[shared:]) for i in ids]
        return Layout(prefix, self.layout(question).tail, "\n\n" + problem), suffixes

    def _encode(self, text: str, first: bool) -> list[int]:
        bos = getattr(self.tok, "bos_token", None)
        # add the tokenizer's own special tokens (e.g. Gemma's <bos>) once, at the very start,
        # unless the chat template already wrote them into the text
        special = first and not (bos and text.startswith(bos))
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def branch(self, layout: Layout, hint: str, kind: str) -> Prompt:
        cue = "" if self.chat else "Solution:"
        if layout.problem:  # diverse: the instruction, then the problem
            text = f"{hint}\n\n{layout.problem}{FORMAT[kind]}{layout.tail}{cue}"
        else:
            text = f"{hint} {FORMAT[kind]}{layout.tail}{cue}"
        return Prompt(text, self._encode(text, first=False))

    def verify(self, layout: Layout, solution: str) -> Prompt:
        cue = "" if self.chat else "Answer:"
        text = f"{layout.problem}Proposed solution:\n{solution.strip()}\n\n{VERIFY_QUESTION}{layout.tail}{cue}"
        return Prompt(text, self._encode(text, first=False))

    def continuation(self, ended: bool) -> list[int]:
        """Tokens that follow a branch's own text to ask the verifier question in the same
        conversation: close the assistant turn (unless the branch already did), ask, open the
        answer. Verification then reads only these tokens on top of the branch's KV."""
        key = bool(ended)
        if key not in self._continuations:
            if self.chat:
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Problem"},
                            {"role": "assistant", "content": _MARK}, {"role": "user", "content": VERIFY_QUESTION}]
                text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                text = text.split(_MARK, 1)[1]
                eos = self.tok.eos_token or ""
                if ended and eos and text.startswith(eos):
                    text = text[len(eos):]
            else:
                text = f"\n\n{VERIFY_QUESTION}\nAnswer:"
            self._continuations[key] = self._encode(text, first=False)
        return self._continuations[key]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def hints_for(branches: int, distinct: bool, diverse: bool = False) -> list[str]:
    """Approach hints (with `diverse`: instructions), one per branch; cycles when there are more
    branches than hints."""
    pool = INSTRUCTIONS if diverse else HINTS
    return [pool[i % len(pool)] if distinct else PLAIN_HINT for i in range(branches)]
