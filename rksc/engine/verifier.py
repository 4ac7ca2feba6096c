"""Verifier: scores a branch by P(YES) / (P(YES) + P(NO)) for the next token after a question.

The verification prompt starts with the same problem prefix as generation, so it extends the
shared prefix KV instead of reading the problem again. On the engine the question is a fork of
each branch's own KV (rksc.reasoning.tree); only `score_logits` is used there.
"""

from __future__ import annotations

import torch


def word_token_ids(tokenizer, word: str) -> list[int]:
    """First-token ids of the spellings of `word` ('YES', 'Yes', ' yes', ...)."""
    ids = set()
    for variant in (word.upper(), word.capitalize(), word.lower()):
        for spelled in (variant, " " + variant):
            toks = tokenizer.encode(spelled, add_special_tokens=False)
            if toks and tokenizer.decode(toks[:1]).strip().lower() == word.lower():
                ids.add(toks[0])
    if not ids:
        raise ValueError(f"the tokenizer has no token for '{word}'")
    return sorted(ids)


class Verifier:
    def __init__(self, runner, tokenizer):
        """`runner`: a DenseRunner (anything with extend and release), for the one-at-a-time baselines."""
        self.runner = runner
        self.yes = torch.tensor(word_token_ids(tokenizer, "yes"))
        self.no = torch.tensor(word_token_ids(tokenizer, "no"))

    def score(self, prefix, suffixes: list[list[int]]) -> tuple[list[float], int]:
        """Scores for each suffix, and the KV bytes the verification batch held."""
        batch, logits = self.runner.extend(prefix, suffixes)
        held = batch.kv_bytes
        self.runner.release(batch)
        return self.score_logits(logits), held

    def score_logits(self, logits: torch.Tensor) -> list[float]:
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        yes, no = probs[:, self.yes].sum(-1), probs[:, self.no].sum(-1)
        return (yes / (yes + no).clamp_min(1e-30)).tolist()
