"""POST /v1/completions and /v1/chat/completions: a checked request becomes one engine job.

The prompt (text, token ids or chat messages) is tokenized off the event loop and checked against
the vocabulary; `max_tokens` (when absent: up to the end of the context, or of what the KV pool
holds) is checked against the context and the pool, so a request that cannot fit is a 400 before
it takes a place in the queue. The reply is rksc.server.reply's, whole or streamed.
"""

from __future__ import annotations

import asyncio
import random

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from rksc import validate
from rksc.engine.completion import completion
from rksc.engine.sampler import Sampling
from rksc.errors import RkscError
from rksc.server import protocol
from rksc.server.choices import Choices
from rksc.server.client import ClientGone, until_disconnect
from rksc.server.loop import Job
from rksc.server.protocol import invalid
from rksc.server.reply import Reply, stream
from rksc.server.state import ServerState
from rksc.server.text import chat_ids, prompt_ids


def _prompt_ids(state: ServerState, req: protocol.GenerateRequest) -> list[int]:
    tok = state.lm.tokenizer
    param = "messages" if req.chat else "prompt"
    try:
        ids = chat_ids(tok, req.messages) if req.chat else prompt_ids(tok, req.prompt)
    except RkscError as e:
        raise invalid(str(e), param) from None
    vocab = state.lm.model.get_input_embeddings().num_embeddings
    if not ids:
        raise invalid(f"{param} is empty (no tokens)", param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"prompt holds token id {bad}, outside this model's vocabulary of {vocab}", param)
    return ids


def _max_tokens(state: ServerState, req: protocol.GenerateRequest, n_prompt: int) -> int:
    context, pool = state.lm.max_context, state.loop.engine.pool
    param = "messages" if req.chat else "prompt"
    asked = req.max_tokens
    if n_prompt + (asked or 1) > context:
        raise invalid(f"prompt too long: {n_prompt} prompt tokens + {asked or 1} new tokens are more than "
                      f"{state.lm.name}'s context of {context} tokens", param, "context_length_exceeded")
    bs = pool.block_size

    def blocks(new: int) -> int:  # the prompt once, each choice its own tokens (+ a copied partial block)
        return -(-n_prompt // bs) + req.n * (-(-new // bs) + 1)

    if asked is None:  # up to the end of the context, or of what the KV pool holds
        asked = context - n_prompt
        while asked > 1 and blocks(asked) > pool.num_blocks:
            asked //= 2
    if blocks(asked) > pool.num_blocks:
        raise invalid(f"{req.n} choice(s) of {asked} tokens on a {n_prompt}-token prompt need more KV blocks "
                      f"than the server's pool holds ({pool.num_blocks} of {bs} tokens); ask for fewer "
                      "tokens or choices", "max_tokens", "kv_budget_exceeded")
    return asked


async def generate(request: Request, state: ServerState, req: protocol.GenerateRequest):
    state.check_model(req.model)
    ids = await asyncio.to_thread(_prompt_ids, state, req)  # a long prompt's tokenization never stalls other clients
    max_tokens = _max_tokens(state, req, len(ids))
    seed = req.seed if req.seed is not None else random.randrange(validate.MAX_SEED)
    sampling = Sampling(req.temperature, req.top_p, seed)
    job = Job(lambda: completion(state.loop.engine, ids, req.n, max_tokens, sampling, state.loop.eos,
                                 req.logprobs, state.completion_asks), watch=True)
    choices = Choices(job, state.loop, state.lm.tokenizer, ids, req.n, req.stop)
    reply = Reply(state, req, ids, choices)
    lease = state.admit(job)
    if req.stream:
        return StreamingResponse(stream(lease, reply), media_type="text/event-stream",
                                 background=BackgroundTask(lease.close))
    try:
        body = await until_disconnect(request, reply.collect())
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        lease.close(ended=choices.done)
    return JSONResponse(body)
