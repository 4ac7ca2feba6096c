"""Greedy agreement of each weight format with the prepared weights computed in fp32, beside the numerical floor.

For each of N held-out GSM8K problems (the natural regime's prompt, one branch, greedy), the first T new
tokens are decoded by rksc's engine with `--dtype float32 --weights fp32` (the reference: the prepared
weights, plain fp32 products) and with each format named in --formats (fp16, int8, ...). The floor is
the same prompts decoded by plain `model.generate` in bfloat16 (the arithmetic a bf16 machine's default
uses, with the weights unchanged; batches of --floor-batch prompts, left-padded): a lossy format whose
agreement is near the floor changes greedy text about as often as bf16 arithmetic does.

Reported per condition:
- free-running: prompts whose T tokens are all identical to the reference (Wilson 95% interval), the
  mean first position where they part, the mean number of identical tokens;
- teacher-forced on the reference's tokens (every position counts, so it separates formats that the
  free-running figure, decided by a few near-ties, cannot): the share of positions whose top token is
  the reference's, and the mean KL divergence from the reference's next-token distribution.

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
    """Greedy tokens from rksc's engine in this format, and the loaded model (for the teacher-forced figures)."""
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
    return out, info, solver


def generate_tokens(model, prompts: list[list[int]], tokens: int, eos: list[int], batch: int) -> list[list[int]]:
    """Greedy tokens from plain `model.generate`, `batch` left-padded prompts at a time."""
    pad = min(eos)
    cfg = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), batch), desc="generate bfloat16", unit="batch"):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            new = model.generate(ids, attention_mask=mask, generation_config=cfg)[:, width:].tolist()
            for row in new:  # generate pads a finished row with the pad token after its end
                end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                out.append(row[:end])
    return out


def teacher_forced(reference, others: dict, prompts: list[list[int]], continuations: list[list[int]]) -> dict:
    """For each model in `others`, over every position of the reference's continuations: the share whose
    top next token is the reference's, and the mean KL(reference || model) of the next-token distribution."""
    top = {name: 0 for name in others}
    kl = {name: 0.0 for name in others}
    positions = 0
    with torch.inference_mode():
        for ids, cont in tqdm(list(zip(prompts, continuations)), desc="teacher-forced", unit="problem"):
            if not cont:
                continue
            seq = torch.tensor([ids + cont])
            at = slice(len(ids) - 1, len(ids) - 1 + len(cont))
            ref = torch.log_softmax(reference(seq).logits[0, at].float(), -1)
            positions += len(cont)
            for name, model in others.items():
                got = torch.log_softmax(model(seq).logits[0, at].float(), -1)
                top[name] += int((got.argmax(-1) == ref.argmax(-1)).sum())
                kl[name] += float((ref.exp() * (ref - got)).sum())
    return {name: {"positions": positions, "top1_agreement": top[name] / positions,
                   "mean_kl": kl[name] / positions} for name in others}


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
    ap.add_argument("--no-floor", action="store_true", help="skip the bf16 generate floor (slow on avx2)")
    ap.add_argument("--floor-batch", type=int, default=8, help="prompts per bf16 generate call")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    problems = load_problems("gsm8k", args.offset, args.problems)
    questions = [p.question for p in problems]
    ref, ref_info, ref_solver = engine_tokens(args.model, "fp32", "float32", questions, args.tokens,
                                              args.concurrency)
    prompts = [ref[i][0] for i in range(len(questions))]
    reference = [ref[i][1] for i in range(len(questions))]
    conditions, models = {}, {}
    for fmt in [f for f in args.formats.split(",") if f]:
        got, info, solver = engine_tokens(args.model, fmt, "float32", questions, args.tokens, args.concurrency)
        if any(got[i][0] != prompts[i] for i in got):
            raise SystemExit(f"{fmt}: the prompts differ from the reference's")
        name = f"engine {fmt} vs engine fp32"
        conditions[name] = {**agreement(reference, [got[i][1] for i in range(len(got))], args.tokens), **info}
        models[name] = solver.lm.model
    if not args.no_floor:
        t = time.perf_counter()
        bf16 = AutoModelForCausalLM.from_pretrained(ref_solver.lm.path, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa").eval()
        floor = generate_tokens(bf16, prompts, args.tokens, sorted(ref_solver.eos), args.floor_batch)
        name = "floor: generate bf16 vs engine fp32"
        conditions[name] = {**agreement(reference, floor, args.tokens), "seconds": time.perf_counter() - t}
        models[name] = bf16
    forced = teacher_forced(ref_solver.lm.model, models, prompts, reference)
    for name, figures in forced.items():
        conditions[name]["teacher_forced"] = figures
    print(f"\n{'condition':38} {'identical':>14} {'95% interval':>14} {'first diff':>10} {'same tokens':>11} "
          f"{'forced top-1':>12} {'mean KL':>9}")
    for name, c in conditions.items():
        first = "-" if c["mean_first_difference"] is None else f"{c['mean_first_difference']:.1f}"
        forced = c["teacher_forced"]
        print(f"{name:38} {c['identical']:>5}/{c['prompts']:<4} {c['identical_rate']:6.1%} "
              f"{c['interval95'][0]:6.1%}-{c['interval95'][1]:5.1%} {first:>10} {c['mean_identical_tokens']:11.1f} "
              f"{forced['top1_agreement']:12.2%} {forced['mean_kl']:9.2e}")
    finish({"model": args.model, "dataset": "gsm8k", "offset": args.offset, "problems": len(questions),
            "tokens": args.tokens, "reference": {"engine": "fp32 weights, float32", **ref_info},
            "conditions": conditions}, args.out)


if __name__ == "__main__":
    main()
