"""Token choice per branch: greedy, or temperature/top-p sampling with one RNG per branch.

Each branch owns a generator seeded from (seed, branch index), so a branch's sample does not
depend on how many other branches run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, sampling: Sampling, rows: int, first_branch: int = 0):
        self.sampling = sampling
        self.generators = []
        if not sampling.greedy:
            for i in range(first_branch, first_branch + rows):
                g = torch.Generator()
                g.manual_seed(sampling.seed * 1_000_003 + i)
                self.generators.append(g)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [B, V] float32 -> (tokens [B], model probability of each token [B] at T=1)."""
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.sampling.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = tempered(logits, self.sampling.temperature)
            if self.sampling.top_p < 1:
                probs = _top_p(probs, self.sampling.top_p)
            tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0]
                                  for i, g in enumerate(self.generators)])
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0].exp()


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) over the last dimension. A temperature so small that the
    division overflows gives the limit: all the mass on the largest logit(s), not NaNs."""
    scaled = logits / temperature
    if not torch.isfinite(scaled).all():
        top = (logits == logits.amax(dim=-1, keepdim=True)).float()
        return top / top.sum(dim=-1, keepdim=True)
    return torch.softmax(scaled, dim=-1)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set whose mass reaches top_p (always at least the top token)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop[..., 0] = False  # also when top_p is below float32's smallest number (it then compares as 0)
    sorted_probs[drop] = 0
    return torch.zeros_like(probs).scatter(1, order, sorted_probs)


CONFIDENCE_TOP_K = 20  # DeepConf's token confidence: minus the mean log-probability of the top 20 tokens


def sample_rows(logits: torch.Tensor, samplings: list[Sampling], generators: list,
                confidence: list[int] | None = None, top: dict[int, int] | None = None
                ) -> tuple[list[int], list[float], dict[int, float], dict[int, tuple[float, list]]]:
    """One token per row, each row with its own settings and generator (None when greedy).
    logits: [R, V] float32 -> (tokens, model probability of each token at T=1, for the rows listed
    in `confidence` their token confidence: -mean log p of the top-20 tokens, high = sure, and for
    each row r of `top` (row -> k) the token's log-probability and the k most likely (id, log p))."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(samplings) if not s.greedy]
    for i in sampled:
        s = samplings[i]
        probs = tempered(logits[i], s.temperature)
        if s.top_p < 1:
            probs = _top_p(probs[None], s.top_p)[0]
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_log = logprobs.gather(1, tokens[:, None])[:, 0]
    chosen = chosen_log.exp()
    confs = {}
    if confidence:
        top20 = logprobs[confidence].topk(CONFIDENCE_TOP_K, dim=-1).values.mean(-1).neg()
        confs = dict(zip(confidence, top20.tolist()))
    tops = {}
    for r, k in (top or {}).items():
        values, ids = logprobs[r].topk(k) if k else (logprobs[r][:0], tokens[:0])
        tops[r] = (chosen_log[r].item(), list(zip(ids.tolist(), values.tolist())))
    return tokens.tolist(), chosen.tolist(), confs, tops


def generator_for(sampling: Sampling, branch: int) -> torch.Generator | None:
    """The generator of branch `branch`: seeded from (seed, branch), as `Sampler` seeds its rows."""
    if sampling.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(sampling.seed * 1_000_003 + branch)
    return g
