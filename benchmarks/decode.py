"""Milliseconds per batched decode step: rksc (block pool, cascade attention), rksc's per-batch
DynamicCache runner, and plain transformers with a DynamicCache, with the weight-streaming bound.

Regime: one context of C tokens shared by B rows (as after a shared prefix), each row then decodes
its own tokens; greedy; bf16; warm-up steps dropped; median of the timed steps. The bound is the
bytes of the weights read once per step (all but an untied input embedding, which is only
gathered) at the measured ~30 GB/s of this machine.

    python benchmarks/decode.py --model qwen2.5-coder-0.5b --batches 1,4,8,16 --contexts 512,1024,2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import finish
from transformers import DynamicCache

from rksc.engine.decode import decode
from rksc.engine.pool_runner import PoolRunner
from rksc.engine.runner import Runner
from rksc.engine.sampler import Sampler, Sampling
from rksc.models.loader import load

BANDWIDTH = 30e9  # bytes/s, measured read bandwidth of this machine (environment.md)


def time_generator(columns, warmup: int, steps: int) -> float:
    times, last = [], time.perf_counter()
    for i, _ in enumerate(columns):
        now = time.perf_counter()
        if i > warmup:
            times.append(now - last)
        last = now
        if i >= warmup + steps:
            break
    return statistics.median(times) * 1000


def rksc_step_ms(runner, prefix, rows, warmup, steps) -> float:
    batch, logits = runner.extend(prefix, [[7 + i] for i in range(rows)])
    ms = time_generator(decode(runner, batch, logits, Sampler(Sampling(), rows), warmup + steps + 2, set()),
                        warmup, steps)
    runner.release(batch)
    return ms


@torch.inference_mode()
def plain_step_ms(model, ctx_ids, rows, warmup, steps) -> float:
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([ctx_ids]), cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(rows)
    token = out.logits[:, -1].argmax(-1).repeat(rows)[:, None]
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--contexts", default="512,1024,2048")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    lm = load(args.model)
    model = lm.model
    # the input embedding is gathered (B rows), not streamed, unless the output projection reuses it
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    streamed = weight_bytes - (0 if tied else embed.numel() * embed.element_size())
    bound_ms = streamed / BANDWIDTH * 1000
    pool = PoolRunner.create(model, budget_bytes=2 << 30)
    shared = Runner(model)
    rows_out = []
    print(f"{args.model} bf16, {streamed / 1e9:.2f} GB of weights read per step -> bound {bound_ms:.1f} ms/step")
    print(f"{'context':>8s} {'B':>3s} {'pool ms':>9s} {'shared ms':>10s} {'plain ms':>9s} {'bound ms':>9s}")
    for ctx in [int(c) for c in args.contexts.split(",")]:
        ids = (torch.arange(ctx) % 5000 + 100).tolist()
        pool_prefix = pool.prefill(ids)
        shared_prefix = shared.prefill(ids)
        for rows in [int(b) for b in args.batches.split(",")]:
            r = {"context": ctx, "batch": rows,
                 "pool_ms": rksc_step_ms(pool, pool_prefix, rows, args.warmup, args.steps),
                 "shared_ms": rksc_step_ms(shared, shared_prefix, rows, args.warmup, args.steps),
                 "plain_ms": plain_step_ms(model, ids, rows, args.warmup, args.steps),
                 "bound_ms": bound_ms}
            rows_out.append(r)
            print(f"{ctx:8d} {rows:3d} {r['pool_ms']:9.1f} {r['shared_ms']:10.1f} {r['plain_ms']:9.1f} {bound_ms:9.1f}")
        pool.release(pool_prefix)
    finish({"model": args.model, "streamed_weight_bytes": streamed, "bandwidth": BANDWIDTH, "results": rows_out},
           args.out)


if __name__ == "__main__":
    main()
