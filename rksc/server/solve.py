"""POST /v1/solve: a whole rksc solve (branches, verifier, selection) as one engine job.

A solve is refused (400) when its answer cannot fit the context or when it may decode more than
`--max-solve-tokens` (`solve_cost`). The server's ASKS setting holds for every request. Whole, the
reply is rksc.server.protocol's solve response; streamed, `solve.chunk`s of branch text as the
branches generate, then one `solve.decision` with the whole response.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from rksc.server import protocol
from rksc.server.client import DONE, ClientGone, sse, until_disconnect
from rksc.server.loop import Done, Failed, Job, Started
from rksc.server.protocol import ApiError, invalid
from rksc.server.state import Lease, ServerState
from rksc.server.text import ChoiceText


def solve_cost(config) -> int:
    """The most tokens a solve may decode: every branch's max_tokens, and at each later depth of a
    tree the kept nodes' children (the verifier's questions come on top)."""
    nodes = config.branches * (1 + (config.depth - 1) * min(config.keep, config.branches))
    return nodes * config.max_new_tokens


def _check_solve(state: ServerState, config) -> None:
    context = state.lm.max_context
    if config.max_new_tokens >= context:
        raise invalid(f"max_tokens {config.max_new_tokens} is more than {state.lm.name}'s context of {context} "
                      "tokens holds after the problem", "max_tokens", "context_length_exceeded")
    cost, limit = solve_cost(config), state.config.max_solve_tokens
    if cost > limit:
        raise invalid(f"this solve may decode {cost:,} tokens (branches x max_tokens, x the nodes its tree adds), "
                      f"more than this server allows (--max-solve-tokens {limit:,}); ask for fewer branches, "
                      "tokens or depth", "max_tokens", "solve_too_large")


async def solve(request: Request, state: ServerState, req: protocol.SolveRequest):
    state.check_model(req.model)
    _check_solve(state, req.config)
    problem = {"question": req.question, "context": req.context}
    config = replace(req.config, **state.asks)  # the server's ASKS setting holds for every request
    job = Job(lambda: state.solver.program(problem, config), watch=req.stream)
    lease = state.admit(job)
    rid = protocol.new_id("solve")
    try:
        first = await until_disconnect(request, job.events.get())
    except ClientGone:
        lease.close()
        return JSONResponse({}, status_code=499)
    if isinstance(first, Failed):
        lease.close(ended=True)
        raise ApiError(first.status, first.message)
    if req.stream:
        return StreamingResponse(_solve_stream(lease, job, first, rid, state), media_type="text/event-stream",
                                 background=BackgroundTask(lease.close))
    ended = False
    try:
        event = first
        while not isinstance(event, (Done, Failed)):
            event = await until_disconnect(request, job.events.get())
        ended = True
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        lease.close(ended=ended)
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message)
    return JSONResponse(protocol.solve_response(event.result, rid, state.lm.name))


async def _solve_stream(lease: Lease, job: Job, event, rid: str, state: ServerState):
    """Chunks `{"object": "solve.chunk", "branch": i, "text": delta, "finish_reason"}` as branches
    generate (i: the order in which the program started them; the branch index at depth 1), then
    one `{"object": "solve.decision", ...}` with the whole solve response."""
    tok, eos, texts, ended = state.lm.tokenizer, state.loop.eos, {}, False
    head = {"id": rid, "object": "solve.chunk", "created": protocol.now(), "model": state.lm.name}
    try:
        while True:
            if isinstance(event, Failed):
                ended = True
                yield sse(ApiError(event.status, event.message).body())
                break
            if isinstance(event, Done):
                ended = True
                yield sse({**protocol.solve_response(event.result, rid, state.lm.name), "object": "solve.decision"})
                break
            if not isinstance(event, Started):
                for u in event:
                    if u.index not in texts:
                        texts[u.index] = ChoiceText(tok, u.prompt_tail or [], skip=eos)
                    text = texts[u.index].add(u.token_ids)
                    if u.stop_reason is not None:
                        text += texts[u.index].finish()
                    if text or u.stop_reason is not None:
                        yield sse({**head, "branch": u.index, "text": text,
                                   "finish_reason": u.stop_reason and protocol.finish_reason(u.stop_reason)})
            event = await job.events.get()
    finally:
        lease.close(ended=ended)
    yield DONE
