"""One problem as the reasoning programs see it: token ids to run, and how to read what comes back.

`Problem` holds the shared prefix and one suffix per root branch (rksc.engine.prompts lays them
out); its reader turns a branch's tokens into the answer it states (rksc.reasoning.answers), the
answer an early-exit probe reads, and the prompts the verifier and a tree's continuations add.
"""

from __future__ import annotations

from dataclasses import dataclass

from rksc.engine.prompts import Layout, Prompt, PromptBuilder
from rksc.reasoning import answers

# a tree's continuation cues: one per child, after its parent's last token
CUES = ("\n\nNext, ", "\n\nLet me check the last step, then continue. ", "\n\nContinuing, ", "\n\nNow, ",
        "\n\nThe next step: ", "\n\nCarefully, ", "\n\nThen, ", "\n\nSo far so good. ")
PROBE_CUE = {"number": "\n\nThe answer is", "choice": "\n\nThe answer is", "math": "\n\nThe answer is \\boxed{"}


def cue_ids(prompts: PromptBuilder) -> list[list[int]]:
    return [prompts.tok(c, add_special_tokens=False)["input_ids"] for c in CUES]


class Reader:
    """Reads a problem's branches: text in token ids out for the prompts it adds, answers out."""

    def __init__(self, prompts: PromptBuilder, layout: Layout, kind: str, letters: str,
                 cue_ids: list[list[int]]):
        """`cue_ids`: CUES as token ids (`cue_ids(prompts)`, once per tokenizer)."""
        self.prompts, self.layout, self.kind, self.letters = prompts, layout, kind, letters
        self.cue_ids = cue_ids
        self.probe_cue = PROBE_CUE[kind]
        self.probe_ids = prompts.tok(self.probe_cue, add_special_tokens=False)["input_ids"]

    def text(self, ids: list[int]) -> str:
        return self.prompts.decode(ids)

    def answer(self, ids: list[int]) -> str | None:
        """The answer a branch's tokens state."""
        return answers.extract(self.text(ids), self.kind, self.letters)

    def probe_answer(self, ids: list[int]) -> str | None:
        """The answer a probe's tokens (written after the probe cue) give."""
        return answers.extract(self.probe_cue + self.text(ids), self.kind, self.letters)

    def continuation(self, ended: bool) -> list[int]:
        """The verifier's question on top of a branch (ended or not)."""
        return self.prompts.continuation(ended)

    def verify_suffix(self, ids: list[int]) -> list[int]:
        """The separate verifier prompt's suffix for a branch's tokens (the paper's way)."""
        return self.prompts.verify(self.layout, self.text(ids)).ids


@dataclass(frozen=True)
class Problem:
    prefix: Prompt  # shared by every branch and verifier question
    suffixes: list[Prompt]  # one per root branch
    hints: list[str]
    reader: Reader

    @property
    def prefix_ids(self) -> list[int]:
        return self.prefix.ids

    @property
    def suffix_ids(self) -> list[list[int]]:
        return [s.ids for s in self.suffixes]
