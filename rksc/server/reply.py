"""A completion or chat completion in OpenAI's shapes: whole (`Reply.collect`) or as stream chunks
(`Reply.chunks`, sent by `stream`).

Choices' text deltas come in from rksc.server.choices; out go the `text_completion`,
`chat.completion` and `chat.completion.chunk` objects, with log-probs, token ids and usage when
the request asked for them. An error after a stream began is sent as an error chunk, then [DONE].
"""

from __future__ import annotations

from rksc.server import protocol
from rksc.server.choices import Choices
from rksc.server.client import DONE, sse
from rksc.server.protocol import ApiError
from rksc.server.state import Lease, ServerState


async def stream(lease: Lease, reply: Reply):
    """The reply's chunks as SSE; the lease is closed once they end, however they end."""
    try:
        async for chunk in reply.chunks():
            yield sse(chunk)
    except ApiError as e:
        yield sse(e.body())
    finally:
        lease.close(ended=reply.choices.done)
    yield DONE


class Reply:
    """A completion or chat completion in OpenAI's shapes, whole or as stream chunks."""

    def __init__(self, state: ServerState, req: protocol.GenerateRequest, ids: list[int], choices: Choices):
        self.req, self.ids, self.choices = req, ids, choices
        self.model, self.tok = state.lm.name, state.lm.tokenizer
        self.id = protocol.new_id("chatcmpl" if req.chat else "cmpl")
        self.created = protocol.now()
        self.object = "chat.completion" if req.chat else "text_completion"
        self._token_text: dict[int, str] = {}

    def token_text(self, token: int) -> str:
        if self.req.tokens_as_ids:
            return f"token_id:{token}"
        if token not in self._token_text:
            self._token_text[token] = self.tok.decode([token])
        return self._token_text[token]

    def usage(self) -> dict:
        return protocol.usage(len(self.ids), self.choices.completion_tokens, self.choices.cached_tokens)

    def _logprobs(self, entries, offset: int):
        if self.req.logprobs is None:
            return None
        if self.req.chat:
            return protocol.chat_logprobs(entries, self.token_text)
        return protocol.completion_logprobs(entries, self.token_text, offset)

    async def collect(self) -> dict:
        n = self.req.n
        texts, tokens, entries, reasons = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        async for deltas in self.choices.deltas():
            for d in deltas:
                texts[d.index] += d.text
                tokens[d.index] += d.token_ids
                entries[d.index] += d.logprobs
                reasons[d.index] = d.finish_reason or reasons[d.index]
        out = []
        for i in range(n):
            choice = {"index": i, "logprobs": self._logprobs(entries[i], 0), "finish_reason": reasons[i]}
            if self.req.chat:
                choice["message"] = {"role": "assistant", "content": texts[i]}
            else:
                choice["text"] = texts[i]
            if self.req.return_token_ids:
                choice["token_ids"] = tokens[i]
            out.append(choice)
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": self.usage()}
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.ids
        return body

    async def chunks(self):
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        offsets = [0] * self.req.n
        if self.req.chat:
            for i in range(self.req.n):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        async for deltas in self.choices.deltas():
            for d in deltas:
                choice = {"index": d.index, "logprobs": self._logprobs(d.logprobs, offsets[d.index]),
                          "finish_reason": d.finish_reason}
                if self.req.chat:
                    choice["delta"] = {"content": d.text} if d.text else {}
                else:
                    choice["text"] = d.text
                if self.req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                offsets[d.index] += len(d.text)
                yield {**head, "choices": [choice]}
        if self.req.include_usage:
            yield {**head, "choices": [], "usage": self.usage()}
