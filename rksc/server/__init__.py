"""The HTTP server (`rksc serve`): OpenAI-compatible completions and chat, plus /v1/solve.

    app.py          FastAPI routes, error handlers, request body limits, `serve()`
    state.py        what the handlers share: the model loading, admission (--max-queue), leases
    completions.py  /v1/completions and /v1/chat/completions: prompt and max_tokens checks, one job
    reply.py        a completion in OpenAI's shapes, whole or as stream chunks
    solve.py        /v1/solve: size checks, one solve job, its response or stream
    client.py       a client's disconnect noticed, SSE messages to it
    loop.py         the engine loop thread that owns the engine; jobs and their events
    choices.py      a completion's choices: token updates in, text deltas out
    text.py         prompts to token ids; incremental detokenization and stop strings
    protocol.py     request checks, OpenAI response and error shapes
    metrics.py      /metrics in the Prometheus text format
"""
