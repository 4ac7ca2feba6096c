"""Token agreement of engine decoding with plain `model.generate`, per dtype and problems in flight.

Regime: GSM8K sample questions, B branches with distinct hints, greedy, N new tokens, the
questions solved with K problems in flight (K = 1: one at a time). For each branch the rksc tokens
(prefix prefilled once, branches batched, rows of K problems per step) are compared with
`model.generate` on that branch's full prompt alone. float32 is expected to agree exactly (the
test suite pins it); in bf16, batched kernels round differently from unbatched ones, so a branch
can drift after some tokens: this script measures how often and how early.

    python benchmarks/exactness.py --model smollm2-135m --dtypes float32,bfloat16 --questions 4 --ks 1,4
"""

from __future__ import annotations

import argparse

import torch
from _common import finish, gsm8k_sample
from transformers import GenerationConfig

from rksc import SolveConfig, Solver


def plain(model, ids, n, eos):
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=min(eos))
    return model.generate(torch.tensor([ids]), generation_config=cfg)[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1", help="problems in flight, e.g. 1,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    results = {}
    for dtype in args.dtypes.split(","):
        solver = Solver.load(args.model, dtype)
        config = SolveConfig(branches=args.branches, max_new_tokens=args.max_new_tokens, verify=False)
        questions = [item["question"] for item in gsm8k_sample(args.questions)]
        refs = {}
        for k in [int(k) for k in args.ks.split(",")]:
            identical = branches = agree_tokens = total_tokens = 0
            first_divergence = []
            for _, result in solver.solve_many(questions, config, concurrency=k):
                for b in result.branches:
                    key = tuple(b.prompt_ids)
                    if key not in refs:
                        refs[key] = plain(solver.lm.model, b.prompt_ids, args.max_new_tokens, solver.eos)
                    ref = refs[key]
                    branches += 1
                    identical += b.token_ids == ref
                    n = max(len(ref), len(b.token_ids))
                    div = next((i for i in range(min(len(ref), len(b.token_ids))) if ref[i] != b.token_ids[i]),
                               None if len(ref) == len(b.token_ids) else min(len(ref), len(b.token_ids)))
                    agree_tokens += n if div is None else div
                    total_tokens += n
                    if div is not None:
                        first_divergence.append(div)
            results[f"{dtype}/K={k}"] = {"dtype": dtype, "k": k, "branches": branches, "identical_branches": identical,
                                         "identical_rate": identical / branches,
                                         "tokens_before_divergence_rate": agree_tokens / total_tokens,
                                         "first_divergence_positions": sorted(first_divergence)}
            print(f"{args.model} {dtype}, K={k}: {identical}/{branches} branches identical to plain generate "
                  f"({identical / branches:.0%}); {agree_tokens}/{total_tokens} tokens before the first divergence "
                  f"({agree_tokens / total_tokens:.0%}); divergences at {sorted(first_divergence)}", flush=True)
        del solver
    finish({"model": args.model, "questions": args.questions, "branches": args.branches,
            "max_new_tokens": args.max_new_tokens, "results": results}, args.out)


if __name__ == "__main__":
    main()
