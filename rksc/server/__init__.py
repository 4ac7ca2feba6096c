"""The HTTP server (`rksc serve`): OpenAI-compatible completions and chat, plus /v1/solve.

    app.py       FastAPI routes, admission (--max-queue), disconnects, SSE, `serve()`
    loop.py      the engine loop thread that owns the engine; jobs and their events
    choices.py   a completion's choices: token updates in, text deltas out
    text.py      prompts to token ids; incremental detokenization and stop strings
    protocol.py  request checks, OpenAI response and error shapes
    metrics.py   /metrics in the Prometheus text format
"""
