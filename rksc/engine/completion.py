"""A completion with `n` choices as a program (rksc.engine.driver), the way the server runs it.

With n > 1 the prompt but its last token runs once as a held sequence; every choice forks it
(copy-free) and feeds the last token, so the choices share the prompt's KV as a solve's branches
share the problem prefix. The choices are added at once: the scheduler starts them when the prefix
is done. The program waits for every choice and returns the prompt tokens the prefix index served.
"""

from __future__ import annotations

from rksc.engine.api import EngineAPI
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Asks, Sequence


def completion(engine: EngineAPI, prompt_ids: list[int], n: int, max_tokens: int, sampling: Sampling,
               eos: frozenset[int], logprobs: int | None = None, asks: Asks | None = None):
    prefix, choices = None, []
    try:
        if n > 1 and len(prompt_ids) > 1:
            prefix = engine.add(Sequence(prompt_ids[:-1], hold=True, asks=asks))
        choices = [engine.add(Sequence(prompt_ids, max_tokens, sampling, i, eos, parent=prefix,
                                       logprobs=logprobs, asks=asks)) for i in range(n)]
        if prefix is not None:
            engine.release(prefix)  # freed once every choice has forked it
        yield choices
        return (prefix or choices[0]).out.cached_tokens
    finally:
        for seq in [prefix, *choices]:  # no-op for those that ended; frees a held prefix
            if seq is not None:
                engine.cancel(seq)
