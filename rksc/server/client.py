"""What a handler sees of its client: whether it is still there, and the SSE events sent to it.

`until_disconnect(request, work)` awaits `work` and, if the client goes away first, cancels it and
raises `ClientGone` (the handler then answers 499 and frees what the request held). `sse` is one
Server-Sent Events message; a stream ends with `DONE`.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

DONE = "data: [DONE]\n\n"  # the last message of every stream, after a reply or an error chunk


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work):
    """Await `work`; if the client goes away first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
