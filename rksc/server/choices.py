"""A completion's choices on the handler side: the engine loop's token updates in, text deltas out.

Each choice decodes its tokens incrementally (rksc.server.text.ChoiceText), ends at a stop string
(the loop is told to stop that sequence at once) or when its sequence ends, and counts its tokens
for `usage`. End-of-sequence tokens count as completion tokens and appear in token ids and
log-probs (as in vLLM), but not in the text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rksc.server.loop import Done, EngineLoop, Failed, Job, Started
from rksc.server.protocol import ApiError, finish_reason
from rksc.server.text import ChoiceText


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]  # generated tokens of this delta (an end-of-sequence token included)
    logprobs: list = field(default_factory=list)  # (token, log p, top [(id, log p)]) per token
    finish_reason: str | None = None  # stop | length, in the choice's last delta


class Choices:
    def __init__(self, job: Job, loop: EngineLoop, tokenizer, prompt_ids: list[int], n: int, stops: list[str]):
        """`job` runs rksc.engine.completion's program with `n` choices of `prompt_ids`."""
        self.job, self.loop, self.eos = job, loop, loop.eos
        self.texts = [ChoiceText(tokenizer, prompt_ids, stops, loop.eos) for _ in range(n)]
        self.ended = [False] * n
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.done = False  # the loop sent its last event

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Deltas as tokens arrive (one list per engine step); raises ApiError if the job failed."""
        while True:
            event = await self.job.events.get()
            if isinstance(event, Failed):
                self.done = True
                raise ApiError(event.status, event.message)
            if isinstance(event, Done):
                self.done, self.cached_tokens = True, event.result
                return
            if isinstance(event, Started):
                continue
            out = [d for u in event if (d := self._delta(u)) is not None]
            if out:
                yield out

    def _delta(self, u) -> Delta | None:
        i = u.index
        if self.ended[i]:
            return None  # e.g. the tokens a choice gained after its stop string, before it was stopped
        if u.stop_reason == "error":
            raise ApiError(500, f"generation failed: {u.error}")
        text = self.texts[i]
        delta = Delta(i, text.add(u.token_ids), list(u.token_ids), list(u.logprobs or []))
        self.completion_tokens += len(u.token_ids)
        if text.stopped:
            delta.finish_reason = "stop"
            self.loop.cancel(self.job, i)
        elif u.stop_reason is not None:
            delta.text += text.finish()
            delta.finish_reason = finish_reason(u.stop_reason)
        self.ended[i] = delta.finish_reason is not None
        if not delta.text and not delta.token_ids and delta.finish_reason is None:
            return None
        return delta
