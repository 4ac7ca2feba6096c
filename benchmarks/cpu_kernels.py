"""Milliseconds per call of every kernel rksc can choose on this machine, side by side in one run.

Regime: 2 threads (default), nothing else on the machine. Products: one [N, K] layer per format
(default 4864x896, Qwen2.5-0.5B's MLP), `--layers` distinct weights in turn so they stream from
memory as in a model, at 1, 8, 32 and 512 rows; the median of `--repeats` passes, formats
interleaved within each pass. Decode attention: B rows over a shared context of C tokens (GQA
14/2, head size 64, as Qwen2.5-0.5B), rksc's kernel against the cascade path (flash attention of
torch, log-sum-exp merge) it replaces, both on the same pool.

    python benchmarks/cpu_kernels.py --out benchmarks/results/cpu-kernels-<kind>.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import finish

from rksc.cache import BlockTable
from rksc.engine.paged import Forward, PagedKV, QueryRow, _cascade
from rksc.kernels import attention
from rksc.kernels.machine import probe
from rksc.models.compute import choose, measure


def attention_ms(rows: int, context: int, repeats: int, block_size: int = 16) -> dict:
    kv_heads, q_heads, dim = 2, 14, 64
    blocks = context // block_size + rows + 1
    kv = PagedKV(1, blocks, block_size, kv_heads, dim, torch.float32)
    g = torch.Generator().manual_seed(0)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    shared = list(range(context // block_size))
    own = [[len(shared) + r] for r in range(rows)]  # each row's one own block holds its new token
    tables = [BlockTable(shared + o, context + 1) for o in own]
    q = torch.randn(1, q_heads, rows, dim, generator=g)
    # the cascade path's layout, as PagedRunner builds it for this shape
    fwd = Forward(kv, torch.zeros(rows, dtype=torch.long), [QueryRow(0, 1, t, torch.tensor([context]), block_size)
                                                            for t in tables])
    from rksc.engine.paged import Segment

    fwd.segments = [Segment(slice(0, context), None, 0)]
    fwd.own = torch.tensor([[o[0] * block_size] for o in own])
    fwd.own_bias = torch.zeros(rows, 1, 1, 1)
    fwd.own_start = torch.full((rows,), context)
    fwd.q_pos = torch.full((rows,), context)
    t32 = torch.tensor([t.blocks for t in tables], dtype=torch.int32)
    lengths = torch.full((rows,), context + 1, dtype=torch.int32)
    runs = {"cascade": lambda: _cascade(q, kv.k[0], kv.v[0], fwd, dim ** -0.5, 0)}
    if attention.available():
        runs["rksc"] = lambda: attention.decode(q[0].transpose(0, 1), kv.k[0], kv.v[0], t32, lengths, block_size,
                                                dim ** -0.5)
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - t) / 10)
    return {f"{k}_ms": statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,512")
    ap.add_argument("--shape", default="4864,896", help="N,K of the layer")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--contexts", default="512,1024,2048", help="attention: shared context lengths")
    ap.add_argument("--attention-rows", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    here = probe()
    n, k = (int(x) for x in args.shape.split(","))
    print(f"{here.cpu} ({here.kind}), {torch.get_num_threads()} threads; auto: {choose(here).label}")
    products = measure(here, tuple(int(r) for r in args.rows.split(",")), (n, k), args.layers, args.repeats)
    fmts = list(dict.fromkeys(x["weights"] for x in products))
    print(f"\nms per {n}x{k} product (GFLOP/s)")
    print(f"{'rows':>5s} " + " ".join(f"{f:>18s}" for f in fmts))
    by = {(x["weights"], x["rows"]): x for x in products}
    for r in sorted({x["rows"] for x in products}):
        print(f"{r:5d} " + " ".join(f"{by[f, r]['ms']:10.3f} ({by[f, r]['gflops']:4.0f})" for f in fmts))
    att = []
    print("\ndecode attention, one layer, ms per call (14 query heads / 2 KV heads, head size 64)")
    print(f"{'context':>8s} {'rows':>5s} {'cascade':>9s} {'rksc':>9s}")
    for ctx in (int(c) for c in args.contexts.split(",")):
        for rows in (int(r) for r in args.attention_rows.split(",")):
            r = {"context": ctx, "rows": rows, **attention_ms(rows, ctx, args.repeats)}
            att.append(r)
            print(f"{ctx:8d} {rows:5d} {r['cascade_ms']:9.3f} {r.get('rksc_ms', float('nan')):9.3f}")
    finish({"benchmark": "kernels", "auto": choose(here).describe(), "shape": [n, k], "products": products,
            "attention": att}, args.out)


if __name__ == "__main__":
    main()
