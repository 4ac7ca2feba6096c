"""Tokens in and text out for the server: prompts as token ids, and each choice's text as its
tokens arrive.

`ChoiceText` decodes a short window of recent tokens instead of single tokens, so a character
split over several tokens appears once it is whole (never a broken one), and a tokenizer that
drops the space before a text's first word still spaces it right (the window starts inside the
prompt). Stop strings are found across token boundaries; text that could be the start of a stop
string is held back until it cannot be.
"""

from __future__ import annotations

from rksc.errors import RkscError

CONTEXT_TOKENS = 6  # prompt tokens the first window starts with
REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


def prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A completion prompt as token ids: text is tokenised as it is (with the tokenizer's usual
    special tokens, e.g. a BOS), ids are taken as they are."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return list(prompt)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages through the model's chat template, with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise RkscError("this model has no chat template; use /v1/completions with a text prompt")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may reject an order of roles (e.g. two user turns)
        raise RkscError(f"the model's chat template cannot render these messages: {str(e)[:200]}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ChoiceText:
    """The text of one generated stream. `add(ids)` returns the text that may be shown now;
    `finish()` returns the rest once the stream has ended. `skip` are token ids never shown
    (end-of-sequence tokens); `stopped` is set when a stop string was found (the text ends
    before it, and the caller stops the sequence)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str] = (), skip: frozenset[int] = frozenset()):
        self.tok, self.stops, self.skip = tokenizer, list(stops), skip
        self.longest = max(map(len, self.stops), default=0)
        self.ids = [t for t in prompt_ids[-CONTEXT_TOKENS:] if t not in skip]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""  # decoded so far (cut at a stop string once found)
        self.sent = 0  # characters of `text` given out
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += [t for t in ids if t not in self.skip]
        self.text += self._decode(final=False)
        return self._release()

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""  # nothing new yet, or a character not yet complete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):]

    def _release(self, final: bool = False) -> str:
        upto = len(self.text)
        if self.stops and not self.stopped:
            start = max(0, self.sent - self.longest + 1)
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text, self.stopped = self.text[:max(min(hits), self.sent)], True
                upto = len(self.text)
            elif not final:  # what might still become a stop string waits
                upto = max(self.sent, len(self.text) - self.longest + 1)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta
