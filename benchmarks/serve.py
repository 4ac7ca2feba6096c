"""Load on `rksc serve`: throughput, latency, overload, soak and chaos, all on the loopback interface.

Regime: the server runs on this machine (started here as `rksc serve --port 0`, or --url of one
already running on 127.0.0.1); requests are GSM8K test questions (deterministic file order) sent as
streamed chat completions (--max-tokens new tokens, temperature 0.7, one choice) and, for a
--solve-share of them, streamed /v1/solve calls (--branches, --max-tokens per branch). Phases:

    overhead  the same requests over HTTP and in this process, alternately (--overhead-rounds); with
              --server-cpus / --client-cpus the load generator keeps off the server's cores
    sweep     closed loop: C clients each send one request after another for --duration s, C in --concurrency
    poisson   open loop: Poisson arrivals at --rate requests/s (default: the sweep's best) for --duration s
    overload  Poisson at 2x that rate: every request must end answered or refused with 429 (lost = 0)
    soak      --soak-minutes of Poisson at half the rate, the server's RSS sampled every 5 s
    chaos     --chaos-clients streams each dropped at a random moment; then /metrics must return to idle
              (no request in flight, no KV block used) within 30 s

Per phase: requests/s, solves/s, output tokens/s, TTFT / TPOT / end-to-end latency p50/p90/p99,
status counts, prefix-hit rate (from /metrics), and the server's peak RSS. Every phase is bounded
in time and in requests (--max-requests); nothing is sent anywhere but 127.0.0.1.

    python benchmarks/serve.py --model qwen2.5-coder-0.5b --duration 60 --concurrency 1,2,4,8 \
        --out benchmarks/results/serve-qwen05.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
from _common import finish, gsm8k_sample

REQUEST_TIMEOUT_S = 300


def cpu_list(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = sorted(values)
    return {f"p{q}": v[min(len(v) - 1, int(q / 100 * len(v)))] for q in (50, 90, 99)}


class Server:
    """A `rksc serve` subprocess on 127.0.0.1 (a free port), or a running one given by URL."""

    def __init__(self, args):
        self.proc = None
        if args.url:
            host = urlparse(args.url).hostname or ""
            if not (host == "localhost" or ipaddress.ip_address(host).is_loopback):
                raise SystemExit(f"--url must be on the loopback interface (got {host})")
            self.url = args.url.rstrip("/")
            return
        cmd = [sys.executable, "-m", "rksc.cli", "serve", "--model", args.model, "--port", "0", "--dtype", args.dtype,
               "--max-queue", str(args.max_queue)] + (["--kv-budget", args.kv_budget] if args.kv_budget else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        cpus = args.server_cpus
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        line = self.proc.stderr.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not match:
            raise SystemExit(f"the server did not start: {line.strip()}")
        self.url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 600
        while httpx.get(self.url + "/health", timeout=30).status_code != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the server did not load its model")
            time.sleep(0.5)

    def rss(self) -> dict:
        """Current and peak resident memory of the server process (MiB), when it runs here."""
        if self.proc is None:
            return {}
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    name, value = line.split(":")
                    fields[name] = int(value.split()[0]) / 1024
        return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {m[0]: float(m[1]) for m in re.findall(r"^(rksc_\S+) (\S+)$", text, re.M)}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)


class Load:
    """Sends requests and records, per request: kind, status, send time, first token, end, tokens."""

    def __init__(self, url: str, model: str, questions: list[str], args, solve_share: float | None = None):
        self.url, self.model, self.questions, self.args = url, model, questions, args
        self.solve_share = args.solve_share if solve_share is None else solve_share
        self.records: list[dict] = []
        self.rng = random.Random(0)
        self.sent = 0

    def body(self, max_tokens: int) -> tuple[str, str, dict]:
        q = self.questions[self.sent % len(self.questions)]
        seed = self.sent
        if self.rng.random() < self.solve_share:
            return "solve", "/v1/solve", {"model": self.model, "problem": q, "branches": self.args.branches,
                                          "max_tokens": max_tokens, "stream": True}
        return "chat", "/v1/chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
            "n": self.args.n, "temperature": 0.7, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one(self, client: httpx.AsyncClient, drop_after: float | None = None) -> None:
        kind, path, body = self.body(self.args.chaos_max_tokens if drop_after else self.args.max_tokens)
        self.sent += 1
        rec = {"kind": kind, "status": None, "t0": time.perf_counter(), "first": None, "end": None, "tokens": 0}
        self.records.append(rec)
        try:
            async with asyncio.timeout(drop_after or REQUEST_TIMEOUT_S):
                async with client.stream("POST", self.url + path, json=body) as r:
                    rec["status"] = r.status_code
                    if r.status_code != 200:
                        await r.aread()
                        rec["end"] = time.perf_counter()
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        data = json.loads(line[6:])
                        if "error" in data:
                            rec["status"] = "stream-error"
                        elif rec["first"] is None and _has_text(data):
                            rec["first"] = time.perf_counter()
                        if data.get("usage"):
                            rec["tokens"] = data["usage"]["completion_tokens"]
                    rec["end"] = time.perf_counter()
        except TimeoutError:
            rec["status"] = "dropped" if drop_after else "timeout"
        except httpx.HTTPError as e:
            rec["status"] = f"lost: {type(e).__name__}"

    async def closed_loop(self, clients: int, duration: float) -> None:
        stop = time.perf_counter() + duration
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as c:
            async def worker():
                while time.perf_counter() < stop and self.sent < self.args.max_requests:
                    await self.one(c)
            await asyncio.gather(*(worker() for _ in range(clients)))

    async def fixed(self, clients: int, count: int) -> None:
        """Closed loop over exactly `count` requests (the overhead comparison's fixed work)."""
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as c:
            async def worker():
                while self.sent < count:
                    await self.one(c)
            await asyncio.gather(*(worker() for _ in range(clients)))

    async def poisson(self, rate: float, duration: float) -> None:
        stop = time.perf_counter() + duration
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as c:
            tasks = []
            while time.perf_counter() < stop and self.sent < self.args.max_requests:
                tasks.append(asyncio.create_task(self.one(c)))
                await asyncio.sleep(self.rng.expovariate(rate))
            await asyncio.gather(*tasks)

    async def chaos(self, clients: int) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as c:
            await asyncio.gather(*(self.one(c, drop_after=self.rng.uniform(0.2, 3.0)) for _ in range(clients)))


def _has_text(chunk: dict) -> bool:
    """A chunk that carries generated text (not chat's opening role chunk, not usage)."""
    if chunk.get("object") == "solve.chunk":
        return bool(chunk.get("text"))
    return any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def summarize(records: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["end"] is not None]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["first"] and r["tokens"] > 1]
    queried = after.get("rksc_prefix_queried_tokens_total", 0) - before.get("rksc_prefix_queried_tokens_total", 0)
    hits = after.get("rksc_prefix_hit_tokens_total", 0) - before.get("rksc_prefix_hit_tokens_total", 0)
    return {
        "sent": len(records), "statuses": statuses, "wall_s": round(wall, 2),
        "requests_per_s": round(len([r for r in ok if r["kind"] == "chat"]) / wall, 3),
        "solves_per_s": round(len([r for r in ok if r["kind"] == "solve"]) / wall, 3),
        "output_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_s": percentiles([r["first"] - r["t0"] for r in ok if r["first"]]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r["end"] - r["t0"] for r in ok]),
        "prefix_hit_rate": round(hits / queried, 4) if queried else None,
    }


def phase(server: Server, load_args, name: str, run) -> dict:
    load = Load(*load_args)
    before, t = server.metrics(), time.perf_counter()
    asyncio.run(run(load))
    wall = time.perf_counter() - t
    out = {"phase": name, **summarize(load.records, wall, before, server.metrics()), **server.rss()}
    def p50(key):
        value = out[key]["p50"]
        return "-" if value is None else f"{value * 1000:.0f} ms"

    print(f"{name:>22}: {out['sent']} sent {out['statuses']}  {out['requests_per_s']} req/s  "
          f"{out['solves_per_s']} solves/s  {out['output_tok_s']} tok/s  p50 TTFT {p50('ttft_s')} "
          f"TPOT {p50('tpot_s')} e2e {p50('e2e_s')}  peak RSS {out.get('peak_rss_mib')} MiB", flush=True)
    return out


def overhead_rounds(server: Server, args, model: str, questions: list[str]) -> list[dict]:
    """The same requests over HTTP, then in this process on one engine, alternately, for
    --overhead-rounds rounds per workload (the machine's speed drifts: alternation and the median
    ratio keep the drift out). Each round asks questions of its own, so neither side finds that
    round's prompts in its prefix index. The in-process side runs on the server's cores
    (--server-cpus) while the server idles; the load generator runs on --client-cpus."""
    solver, out = None, []
    count, clients = args.overhead_requests, args.overhead_clients
    for k in range(args.overhead_rounds):
        qs = (questions[k * count:] + questions)[:count]
        for kind in args.overhead_workloads.split(","):
            share = 1.0 if kind == "solve" else 0.0
            r = phase(server, (server.url, model, qs, args, share), f"overhead {kind} #{k + 1} (HTTP)",
                      lambda load: load.fixed(clients, count))
            if args.server_cpus:
                os.sched_setaffinity(0, args.server_cpus)
            solver = solver or local_solver(args)
            local = in_process(args, solver, qs, kind, count, clients)
            if args.client_cpus:
                os.sched_setaffinity(0, args.client_cpus)
            r.update(kind=kind, round=k + 1, clients=clients, in_process=local,
                     http_vs_in_process=round(r["output_tok_s"] / local["output_tok_s"], 3))
            print(f"{'':>22}  in-process {local['output_tok_s']} tok/s ({local['wall_s']} s): HTTP is "
                  f"{r['http_vs_in_process']}x", flush=True)
            out.append(r)
    return out


def local_solver(args):
    """An engine in this process with the server's model and pool settings, kernels warmed."""
    from rksc.models.loader import load
    from rksc.reasoning.solver import Solver, SolveConfig
    from rksc.validate import parse_size

    solver = Solver(load(args.model, args.dtype, args.threads),
                    kv_budget=parse_size(args.kv_budget) if args.kv_budget else None)
    solver.solve("Warm-up: what is 2 plus 3?", SolveConfig(branches=2, max_new_tokens=8))
    solver.engine.drop_cached()
    return solver


def in_process(args, solver, questions: list[str], kind: str, count: int, clients: int) -> dict:
    """The overhead phase's work without HTTP: the same requests as the engine loop builds them
    (chat: the prompt prefilled once, n forks sampled with seed = request number; solve: the same
    SolveConfig), `clients` in flight on one engine with the server's pool settings."""
    from rksc.engine.sampler import Sampling
    from rksc.engine.sequence import Sequence
    from rksc.reasoning.solver import SolveConfig
    from rksc.server.text import chat_ids

    engine, eos, tok = solver.engine, frozenset(solver.eos), solver.lm.tokenizer
    qs = [questions[i % len(questions)] for i in range(count)]

    def chat(i: int, q: str):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        prefix = engine.add(Sequence(ids[:-1], hold=True)) if args.n > 1 and len(ids) > 1 else None
        seqs = [engine.add(Sequence(ids, args.max_tokens, Sampling(0.7, 1.0, i), j, eos, parent=prefix))
                for j in range(args.n)]
        if prefix is not None:
            engine.release(prefix)
        yield seqs
        return sum(len(s.token_ids) for s in seqs)

    t = time.perf_counter()
    if kind == "chat":
        tokens = sum(r for _, r in engine.run((chat(i, q) for i, q in enumerate(qs)), clients))
    else:
        config = SolveConfig(branches=args.branches, max_new_tokens=args.max_tokens)
        tokens = sum(r.timing.new_tokens for _, r in solver.solve_many(qs, config, concurrency=clients))
    wall = time.perf_counter() - t
    return {"kind": kind, "requests": count, "clients": clients, "wall_s": round(wall, 2), "tokens": tokens,
            "output_tok_s": round(tokens / wall, 1)}


def rss_slope(samples: list[tuple], warmup_minutes: float) -> dict:
    """Least-squares slope of RSS (MiB per minute) over the samples after the warm-up."""
    import numpy as np

    after = [(t, rss) for t, rss, _ in samples if t >= warmup_minutes]
    if len(after) < 2:
        return {"rss_slope_mib_per_min": None, "rss_after_warmup_mib": None, "rss_end_mib": None}
    t, rss = np.array(after).T
    return {"rss_slope_mib_per_min": round(float(np.polyfit(t, rss, 1)[0]), 3),
            "rss_after_warmup_mib": after[0][1], "rss_end_mib": after[-1][1]}


def wait_idle(server: Server, timeout: float = 30) -> float | None:
    """Seconds until no request is in flight and no KV block is used; None if not within `timeout`."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        m = server.metrics()
        if m.get("rksc_requests_in_flight") == 0 and m.get('rksc_kv_blocks{state="used"}') == 0:
            return round(time.perf_counter() - t, 2)
        time.sleep(0.1)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--url", help="a server already running on 127.0.0.1 (default: start one)")
    p.add_argument("--kv-budget", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server and of the in-process run (1 leaves a core to the clients)")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per chat request and per solve branch")
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--solve-share", type=float, default=0.2,
                   help="fraction of requests that are /v1/solve in the poisson, overload, soak and chaos phases")
    p.add_argument("-n", "--n", type=int, default=1, help="choices per chat completion")
    p.add_argument("--workloads", default="mix",
                   help="sweep workloads, comma-separated: chat (chat completions only), solve (/v1/solve only), "
                        "mix (--solve-share of /v1/solve)")
    p.add_argument("--overhead-requests", type=int, default=32,
                   help="overhead phase: requests per workload, sent over HTTP then run in-process")
    p.add_argument("--overhead-clients", type=int, default=16)
    p.add_argument("--overhead-workloads", default="chat,solve", help="overhead phase: chat, solve or both")
    p.add_argument("--overhead-rounds", type=int, default=3, help="overhead phase: HTTP / in-process alternations")
    p.add_argument("--server-cpus", type=cpu_list, default=None,
                   help="cores the server (and the in-process comparison) runs on, e.g. 0 (default: any)")
    p.add_argument("--client-cpus", type=cpu_list, default=None,
                   help="cores the load generator runs on, e.g. 1 (default: any)")
    p.add_argument("--concurrency", default="1,2,4,8", help="closed-loop clients per sweep step")
    p.add_argument("--duration", type=float, default=60, help="seconds per phase")
    p.add_argument("--rate", type=float, default=None, help="Poisson requests/s (default: the sweep's best)")
    p.add_argument("--phases", default="sweep,poisson,overload,chaos",
                   help="from overhead, sweep, poisson, overload, chaos (soak: --soak-minutes)")
    p.add_argument("--soak-minutes", type=float, default=0)
    p.add_argument("--soak-warmup-minutes", type=float, default=5,
                   help="soak: RSS samples after this many minutes give the slope (least squares)")
    p.add_argument("--chaos-clients", type=int, default=16)
    p.add_argument("--chaos-max-tokens", type=int, default=512, help="long requests, so drops land mid-stream")
    p.add_argument("--max-requests", type=int, default=5000, help="cap on requests per phase")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    phases = args.phases.split(",") + (["soak"] if args.soak_minutes > 0 else [])
    questions = [row["question"] for row in gsm8k_sample(50)]
    server = Server(args)
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    load_args = (server.url, model, questions, args)
    results, rate = [], args.rate
    try:
        overhead = []
        httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={  # kernels warmed once
            "model": model, "messages": [{"role": "user", "content": "Warm-up: what is 2 plus 3?"}],
            "max_tokens": args.max_tokens, "n": args.n})
        if "overhead" in phases:  # first, while the prefix index holds none of these prompts
            overhead = overhead_rounds(server, args, model, questions)
        shares = {"chat": 0.0, "solve": 1.0, "mix": args.solve_share}
        if "sweep" in phases:
            for w in args.workloads.split(","):
                for c in map(int, args.concurrency.split(",")):
                    r = phase(server, load_args + (shares[w],), f"sweep {w} C={c}",
                              lambda load, c=c: load.closed_loop(c, args.duration))
                    results.append({**r, "workload": w, "concurrency": c})
            mixed = [r for r in results if r["workload"] == "mix"] or results
            rate = rate or max(r["requests_per_s"] + r["solves_per_s"] for r in mixed) or 1.0
        rate = rate or 1.0
        if "poisson" in phases:
            results.append({**phase(server, load_args, f"poisson {rate:.2f}/s",
                                    lambda load: load.poisson(rate, args.duration)), "rate": rate})
        if "overload" in phases:
            r = phase(server, load_args, f"overload {2 * rate:.2f}/s",
                      lambda load: load.poisson(2 * rate, args.duration))
            answered, refused = r["statuses"].get("200", 0), r["statuses"].get("429", 0)
            r.update(rate=2 * rate, answered=answered, refused_429=refused, lost=r["sent"] - answered - refused)
            print(f"{'':>22}  answered {answered} + 429 {refused} = {answered + refused} of {r['sent']} sent; "
                  f"lost {r['lost']}", flush=True)
            results.append(r)
        if "soak" in phases:
            samples = []

            async def soak(load):
                task = asyncio.create_task(load.poisson(rate / 2, args.soak_minutes * 60))
                start = time.perf_counter()
                while not task.done():  # the server's RSS (its /metrics), and KV blocks holding tokens
                    m = await asyncio.to_thread(server.metrics)
                    samples.append((round((time.perf_counter() - start) / 60, 3),
                                    round(m["rksc_resident_memory_bytes"] / 2**20, 1),
                                    m.get('rksc_kv_blocks{state="used"}', 0) + m.get('rksc_kv_blocks{state="cached"}', 0)))
                    await asyncio.sleep(5)
                await task

            r = phase(server, load_args, f"soak {args.soak_minutes} min", soak)
            r.update(rss_samples=samples, **rss_slope(samples, args.soak_warmup_minutes))
            r["lost"] = r["sent"] - r["statuses"].get("200", 0) - r["statuses"].get("429", 0)
            print(f"{'':>22}  RSS {r['rss_after_warmup_mib']} -> {r['rss_end_mib']} MiB; slope after "
                  f"{args.soak_warmup_minutes} min of warm-up {r['rss_slope_mib_per_min']} MiB/min; lost {r['lost']}; "
                  f"e2e p50 / p99 {r['e2e_s']['p50']} / {r['e2e_s']['p99']} s", flush=True)
            results.append(r)
        if "chaos" in phases:
            r = phase(server, load_args, f"chaos {args.chaos_clients} drops",
                      lambda load: load.chaos(args.chaos_clients))
            r["idle_after_s"] = wait_idle(server)
            print(f"{'':>22}  back to idle (no request in flight, no KV block used) after {r['idle_after_s']} s",
                  flush=True)
            results.append(r)
    finally:
        server.stop()
    results += overhead
    for kind in args.overhead_workloads.split(",") if overhead else ():
        ratios = sorted(r["http_vs_in_process"] for r in overhead if r["kind"] == kind)
        print(f"{'overhead ' + kind:>22}: HTTP / in-process tok/s, median of {len(ratios)} rounds "
              f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
    finish({"benchmark": "serve", "model": model, "dtype": args.dtype, "max_tokens": args.max_tokens, "n": args.n,
            "branches": args.branches, "solve_share": args.solve_share, "phases": results}, args.out)


if __name__ == "__main__":
    main()
