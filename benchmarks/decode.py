"""Milliseconds per batched decode step: the rksc engine (block pool, cascade attention), rksc's
per-batch DynamicCache runner, and plain transformers with a DynamicCache, with the weight-streaming
bound; and the engine's step for R rows from P different prefixes (several problems in flight).

Regime: P contexts of C tokens, R rows spread evenly over them (as after each problem's shared
prefix), each row then decodes its own tokens; greedy; the machine's default dtype and weight format
(`--dtype`, `--weights` to choose; recorded in the JSON with the machine); warm-up steps dropped;
median of the timed steps. An engine step is everything a decode step costs: scheduling, the
forward, sampling. The bound is the bytes of the weights read once per step (all but an untied input
embedding, which is only gathered) at the measured ~30 GB/s of the project's machines.

    python benchmarks/decode.py --model qwen2.5-coder-0.5b --batches 1,4,8,16 --contexts 512,1024,2048
    python benchmarks/decode.py --grid --contexts 1024 --batches 8,16,32,64 --prefixes 1,2,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import context_ids, decoding_rows, finish, step_ms
from transformers import DynamicCache

from rksc.engine.decode import decode
from rksc.engine.engine import Engine
from rksc.engine.dense import DenseRunner
from rksc.engine.sampler import Sampler, Sampling
from rksc.models.compute import BYTES
from rksc.models.loader import load
from rksc.models.weights import dense_weight, linear_layers

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


def shared_step_ms(runner, prefix, rows, warmup, steps) -> float:
    batch, logits = runner.extend(prefix, [[7 + i] for i in range(rows)])
    return time_generator(decode(runner, batch, logits, Sampler(Sampling(), rows), warmup + steps + 2, set()),
                          warmup, steps)


def engine_step_ms(engine, ctx: int, rows: int, prefixes: int, warmup: int, steps: int) -> float:
    engine.drop_cached()
    seqs = decoding_rows(engine, [context_ids(ctx, p) for p in range(prefixes)], rows)
    ms = step_ms(engine, warmup, steps)
    for s in seqs:
        engine.cancel(s)
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
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--contexts", default="512,1024,2048")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grid", action="store_true", help="engine only: rows x prefixes grid")
    ap.add_argument("--prefixes", default="1,2,4,8", help="with --grid: distinct prefixes the rows fork")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    lm = load(args.model, args.dtype, weights=args.weights)
    model = lm.model
    # bytes read per step: every linear layer's weights (the input embedding is only gathered, B rows)
    streamed = sum(dense_weight(m).numel() * BYTES[lm.compute.weights] for m in linear_layers(model))
    bound_ms = streamed / BANDWIDTH * 1000
    engine = Engine(model, kv_budget=4 << 30)
    shared = DenseRunner(model)
    rows_out = []
    print(f"{args.model}, {lm.compute.label} on {lm.machine.cpu} ({lm.machine.kind}), {streamed / 1e9:.2f} GB of "
          f"weights read per step -> bound {bound_ms:.1f} ms/step")
    if args.grid:
        print(f"{'context':>8s} {'rows':>5s} {'prefixes':>9s} {'engine ms':>10s} {'bound ms':>9s}")
        for ctx in [int(c) for c in args.contexts.split(",")]:
            for rows in [int(b) for b in args.batches.split(",")]:
                for prefixes in [int(p) for p in args.prefixes.split(",") if int(p) <= rows]:
                    ms = engine_step_ms(engine, ctx, rows, prefixes, args.warmup, args.steps)
                    rows_out.append({"context": ctx, "rows": rows, "prefixes": prefixes, "engine_ms": ms,
                                     "bound_ms": bound_ms})
                    print(f"{ctx:8d} {rows:5d} {prefixes:9d} {ms:10.1f} {bound_ms:9.1f}")
    else:
        print(f"{'context':>8s} {'B':>3s} {'engine ms':>10s} {'shared ms':>10s} {'plain ms':>9s} {'bound ms':>9s}")
        for ctx in [int(c) for c in args.contexts.split(",")]:
            ids = context_ids(ctx)
            shared_prefix = shared.prefill(ids)
            for rows in [int(b) for b in args.batches.split(",")]:
                r = {"context": ctx, "batch": rows,
                     "engine_ms": engine_step_ms(engine, ctx, rows, 1, args.warmup, args.steps),
                     "shared_ms": shared_step_ms(shared, shared_prefix, rows, args.warmup, args.steps),
                     "plain_ms": plain_step_ms(model, ids, rows, args.warmup, args.steps),
                     "bound_ms": bound_ms}
                rows_out.append(r)
                print(f"{ctx:8d} {rows:3d} {r['engine_ms']:10.1f} {r['shared_ms']:10.1f} {r['plain_ms']:9.1f} "
                      f"{bound_ms:9.1f}")
    finish({"model": args.model, "compute": lm.compute.describe(), "streamed_weight_bytes": streamed, "bandwidth": BANDWIDTH, "results": rows_out},
           args.out)


if __name__ == "__main__":
    main()
