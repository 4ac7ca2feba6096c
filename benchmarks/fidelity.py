"""Greedy agreement of each weight format with the prepared weights computed in fp32, beside the numerical floor.

For each of N held-out GSM8K problems (the natural regime's prompt, one branch, greedy), the first T new
tokens are decoded by rksc's engine with `--dtype float32 --weights fp32` (the reference: the prepared
weights, plain fp32 products) and with each format named in --formats (fp16, int8, ...). The floor is
the same prompts decoded by plain `model.generate` in bfloat16 against `model.generate` in float32
(the rounding a bf16 machine's default adds, with no format change at all): a lossy format whose
agreement is near the floor changes greedy text about as often as bf16 arithmetic does.

Reported per condition: prompts whose T tokens are all identical to the reference (with a Wilson 95%
interval), the mean first position where they part, and the mean number of identical tokens.

    python benchmarks/fidelity.py --model qwen2.5-coder-0.5b --problems 200 --formats fp16,int8 \\
        --out benchmarks/results/fidelity-avx2/qwen05.json
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import finish
from scipy.stats import binomtest
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from rksc import SolveConfig, Solver
from rksc.bench.datasets import load_problems


def engine_tokens(model: str, weights: str, dtype: str, questions: list[str], tokens: int, concurrency: int):
    solver = Solver.load(model, dtype, weights=weights)
    config = SolveConfig(branches=1, max_new_tokens=tokens, verify=False, select="vote")
    t = time.perf_counter()
    out = {}
    for i, result in tqdm(solver.solve_many(questions, config, concurrency=concurrency), total=len(questions),
                          desc=f"engine {weights}", unit="problem"):
        if isinstance(result, Exception):
            raise SystemExit(f"problem {i} failed: {result}")
        branch = result.branches[0]
        out[i] = (list(branch.prompt_ids), list(branch.token_ids))
    info = {"compute": solver.lm.compute.describe(), "seconds": time.perf_counter() - t}
    path, eos = solver.lm.path, sorted(solver.eos)
    solver.close()
    return out, info, path, eos


def generate_tokens(path, dtype: str, prompts: list[list[int]], tokens: int, eos: list[int]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    cfg = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=min(eos))
    out = []
    with torch.inference_mode():
        for ids in tqdm(prompts, desc=f"generate {dtype}", unit="problem"):
            out.append(model.generate(torch.tensor([ids]), generation_config=cfg)[0, len(ids):].tolist())
    return out


def agreement(reference: list[list[int]], other: list[list[int]], tokens: int) -> dict:
    identical, parts, same = 0, [], []
    for ref, got in zip(reference, other):
        ref, got = ref[:tokens], got[:tokens]
        first = next((i for i in range(min(len(ref), len(got))) if ref[i] != got[i]),
                     None if len(ref) == len(got) else min(len(ref), len(got)))
        identical += first is None
        if first is not None:
            parts.append(first)
        same.append(len(ref) if first is None else first)
    n = len(reference)
    ci = binomtest(identical, n).proportion_ci(method="wilson")
    lo, hi = float(ci.low), float(ci.high)
    return {"prompts": n, "identical": identical, "identical_rate": identical / n, "interval95": [lo, hi],
            "mean_first_difference": sum(parts) / len(parts) if parts else None,
            "mean_identical_tokens": sum(same) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--formats", default="fp16,int8")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-floor", action="store_true", help="skip the bf16-vs-fp32 generate floor (slow on avx2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    problems = load_problems("gsm8k", args.offset, args.problems)
    questions = [p.question for p in problems]
    ref, ref_info, path, eos = engine_tokens(args.model, "fp32", "float32", questions, args.tokens,
                                             args.concurrency)
    prompts = [ref[i][0] for i in range(len(questions))]
    reference = [ref[i][1] for i in range(len(questions))]
    conditions = {}
    for fmt in [f for f in args.formats.split(",") if f]:
        got, info, _, _ = engine_tokens(args.model, fmt, "float32", questions, args.tokens, args.concurrency)
        if any(got[i][0] != prompts[i] for i in got):
            raise SystemExit(f"{fmt}: the prompts differ from the reference's")
        conditions[f"engine {fmt} vs engine fp32"] = {**agreement(reference, [got[i][1] for i in range(len(got))],
                                                                  args.tokens), **info}
    if not args.no_floor:
        t = time.perf_counter()
        f32 = generate_tokens(path, "float32", prompts, args.tokens, eos)
        f32_s = time.perf_counter() - t
        t = time.perf_counter()
        b16 = generate_tokens(path, "bfloat16", prompts, args.tokens, eos)
        conditions["floor: generate bf16 vs generate fp32"] = {**agreement(f32, b16, args.tokens),
                                                               "seconds": time.perf_counter() - t}
        conditions["check: engine fp32 vs generate fp32"] = {**agreement(f32, reference, args.tokens),
                                                             "seconds": f32_s}
    print(f"\n{'condition':48} {'identical':>14} {'95% interval':>14} {'first diff':>10} {'same tokens':>11}")
    for name, c in conditions.items():
        first = "-" if c["mean_first_difference"] is None else f"{c['mean_first_difference']:.1f}"
        print(f"{name:48} {c['identical']:>5}/{c['prompts']:<4} {c['identical_rate']:6.1%} "
              f"{c['interval95'][0]:6.1%}-{c['interval95'][1]:5.1%} {first:>10} {c['mean_identical_tokens']:11.1f}")
    finish({"model": args.model, "dataset": "gsm8k", "offset": args.offset, "problems": len(questions),
            "tokens": args.tokens, "reference": {"engine": "fp32 weights, float32", **ref_info},
            "conditions": conditions}, args.out)


if __name__ == "__main__":
    main()
