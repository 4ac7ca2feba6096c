"""RSBCM under memory pressure: each eviction policy replays the same request streams on KV pools of
25%, 50% and 100% of the stream's working set.

Streams (real GSM8K problems from tests/data, the model's own tokenizer, the engine's own programs):
  server  Poisson arrivals (mean gap --gap engine steps) of solves under 3 shared few-shot headers;
          about 1 request in 4 asks an earlier problem again, under the same header
  tree    tree-of-thoughts solves (depth 3, keep 2) under one few-shot header, 2 in flight
  chat    multi-turn chats: every conversation's next turn comes back after the other conversations'
          turns (the prompt carries the earlier turns and answers)
  batch   a batch of problems with --concurrency 8 (all there at once)

The working set of a stream is the most blocks it holds at once (referenced plus cached) on an ample
pool, where nothing is evicted; that run's tokens are the reference. Each policy then replays the
stream at each budget, in an order rotated per budget. Per run: prefix-hit rate (prompt tokens the
prefix index served / prompt tokens looked up), prompt tokens computed, evictions, preemptions, wall
time, requests per hour, and how many requests' tokens equal the reference's (float32, greedy); and how
many evictions cut a chain (took a block that other cached blocks extend, so those can no longer be hit).
Arrivals are counted in engine steps, so a stream is the same sequence of requests for every policy.

    python benchmarks/eviction.py --streams server --out results/eviction/smollm2-server.json   # one per stream
    python benchmarks/eviction.py --model qwen2.5-coder-0.5b --streams server --size 16 --budgets 0.25 0.5
    python benchmarks/eviction.py --report results/eviction/smollm2-*.json --plot results/eviction/smollm2.png
"""

from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import dataclass, field

from _common import finish, gsm8k_sample

from rksc import SolveConfig, Solver
from rksc.cache import POLICIES
from rksc.engine.driver import Driver, failed
from rksc.engine.sequence import Sequence
from rksc.models.loader import load

STREAMS = ("server", "tree", "chat", "batch")
FOLLOW_UPS = ("Check that answer step by step.", "Now give only the final number.")


@dataclass
class Request:
    arrival: int  # the engine step at which it arrives
    problem: dict | None = None  # a solve: question and context
    config: SolveConfig | None = None
    chat: int | None = None  # a chat turn: the conversation
    turn: str = ""  # the user's message of that turn
    after: int | None = None  # a request that must be done first (the conversation's previous turn)


@dataclass
class Stream:
    name: str
    requests: list[Request]
    in_flight: int  # programs at most in flight
    chats: int = 0


@dataclass
class Run:
    outputs: dict[int, tuple] = field(default_factory=dict)
    peak_blocks: int = 0
    wall_s: float = 0.0


def _solution(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).replace("####", "The answer is")


def _header(examples: list[dict]) -> str:
    return "".join(f"Example problem: {e['question']}\nExample solution: {_solution(e['answer'])}\n\n"
                   for e in examples)


def _arrivals(n: int, gap: float, rng: random.Random) -> list[int]:
    t, out = 0.0, []
    for _ in range(n):
        out.append(round(t))
        t += rng.expovariate(1.0 / gap)
    return out


def build(name: str, problems: list[dict], size: int, gap: float, seed: int, new_tokens: int) -> Stream:
    rng = random.Random(seed)
    headers = [_header(problems[i:i + 3]) for i in (0, 3, 6)]
    questions = problems[9:]
    solve = SolveConfig(branches=4, max_new_tokens=new_tokens)
    if name == "server":
        requests, asked = [], []
        for arrival in _arrivals(size, gap, rng):
            if asked and rng.random() < 0.25:
                item = rng.choice(asked)  # asked again, under the same header
            else:
                item = {"question": questions[len(asked) % len(questions)]["question"],
                        "context": rng.choice(headers)}
                asked.append(item)
            requests.append(Request(arrival, dict(item), solve))
        return Stream(name, requests, in_flight=16)
    if name == "tree":
        tree = SolveConfig(branches=4, max_new_tokens=new_tokens // 2, depth=3, keep=2)
        return Stream(name, [Request(0, {"question": q["question"], "context": headers[0]}, tree)
                             for q in questions[:size]], in_flight=2)
    if name == "chat":
        chats, turns = size, [None, *FOLLOW_UPS]
        requests = []
        for t, follow_up in enumerate(turns):  # every conversation's turn t, then every one's turn t + 1
            for c in range(chats):
                text = questions[c]["question"] if follow_up is None else follow_up
                after = None if t == 0 else len(requests) - chats
                requests.append(Request(round((t * chats + c) * gap), chat=c, turn=text, after=after))
        return Stream(name, requests, in_flight=4, chats=chats)
    if name == "batch":
        return Stream(name, [Request(0, {"question": q["question"]}, solve) for q in questions[:size]], in_flight=8)
    raise ValueError(name)


def chat_turn(solver: Solver, history: list[dict], text: str, max_tokens: int):
    """One chat completion (greedy) of the conversation so far plus `text`; the answer joins `history`."""
    messages = history + [{"role": "user", "content": text}]
    tok = solver.prompts.tok
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    seq = solver.engine.add(Sequence(ids, max_tokens, stop_ids=frozenset(solver.eos)))
    try:
        yield [seq]
    finally:
        if not seq.finished:
            solver.engine.cancel(seq)
    failed([seq])
    history[:] = messages + [{"role": "assistant", "content": tok.decode(seq.token_ids, skip_special_tokens=True)}]
    return tuple(seq.token_ids)


def _output(result) -> tuple:
    if isinstance(result, BaseException):
        return ("error", str(result))
    if isinstance(result, tuple):
        return result
    return (result.answer, tuple(tuple(b.token_ids) for b in result.branches))


def replay(solver: Solver, stream: Stream, new_tokens: int) -> Run:
    """Every request of the stream on the solver's engine, each admitted at its arrival step (the clock
    skips ahead while the engine is idle) once its dependency is done and a program slot is free."""
    engine, pool, run = solver.engine, solver.engine.pool, Run()
    flight = Driver(engine)
    pending = sorted(range(len(stream.requests)), key=lambda i: stream.requests[i].arrival)
    histories: list[list[dict]] = [[] for _ in range(stream.chats)]
    skipped = 0
    t0 = time.perf_counter()

    def done(index, result):
        run.outputs[index] = _output(result)

    def free(i: int) -> bool:  # its dependency (a chat's previous turn) is done
        return stream.requests[i].after is None or stream.requests[i].after in run.outputs

    while len(run.outputs) < len(stream.requests):
        now = engine.stats.steps + skipped
        ready = [i for i in pending if stream.requests[i].arrival <= now and free(i)]
        for i in ready:
            if len(flight) >= stream.in_flight:
                break
            pending.remove(i)
            r = stream.requests[i]
            program = (solver.program(r.problem, r.config) if r.chat is None
                       else chat_turn(solver, histories[r.chat], r.turn, new_tokens))
            ended = flight.start(i, program)
            if ended is not None:
                done(*ended)
        for ended in flight.resume_ready():
            done(*ended)
        if engine.has_work:
            engine.step()
            run.peak_blocks = max(run.peak_blocks, pool.num_used + pool.num_cached)
        elif not flight and pending and not ready:  # idle until the next arrival
            skipped += max(min(stream.requests[i].arrival for i in pending if free(i)) - now, 0)
        elif flight.stalled():
            raise RuntimeError("programs wait for sequences that the engine does not have")
    run.wall_s = time.perf_counter() - t0
    return run


def measure(lm, stream: Stream, policy: str, blocks: int, block_bytes: int, new_tokens: int,
            reference: dict | None) -> tuple[dict, Run]:
    solver = Solver(lm, kv_budget=blocks * block_bytes, evict=policy)
    run = replay(solver, stream, new_tokens)
    pool, st = solver.engine.pool.stats, solver.engine.stats
    row = {"stream": stream.name, "policy": policy, "blocks": blocks, "requests": len(stream.requests),
           "hit_rate": pool.hit_tokens / max(pool.queried_tokens, 1), "queried_tokens": pool.queried_tokens,
           "hit_tokens": pool.hit_tokens, "prefill_tokens": st.prefill_tokens, "evictions": pool.evictions,
           "cut": pool.cut,
           "preemptions": solver.engine.scheduler.preemptions, "wall_s": run.wall_s,
           "requests_per_hour": len(stream.requests) / run.wall_s * 3600, "peak_blocks": run.peak_blocks,
           "errors": sum(o[0] == "error" for o in run.outputs.values())}
    if reference is not None:
        row["outputs_equal"] = sum(run.outputs[i] == reference[i] for i in reference)
    return row, run


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(r["stream"] for r in rows))
    fig, axes = plt.subplots(1, len(streams), figsize=(4 * len(streams), 3.4), squeeze=False)
    for ax, name in zip(axes[0], streams):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["budget"] is not None):
            pts = sorted((r["budget"], r["prefill_tokens"]) for r in rows
                         if r["stream"] == name and r["policy"] == policy and r["budget"] is not None)
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=policy)
        for r in rows:
            if r["stream"] == name and r["budget"] is None:
                ax.axhline(r["prefill_tokens"], color="grey", linestyle="--", linewidth=1, label="ample pool")
        ax.set_title(name)
        ax.set_xlabel("KV budget, % of working set")
        ax.set_ylabel("prompt tokens computed")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(paths: list[str], plot_path: str | None) -> None:
    """Markdown table of saved runs, and per stream and budget below 100% the policy that computed
    the fewest prompt tokens, with the others' excess over it."""
    import json

    runs = [json.loads(open(p).read()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    print("| stream | budget | policy | blocks | hit rate | prompt tokens computed | evictions | of them cut a chain "
          "| preemptions | wall s | requests/h | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget = "ample" if r["budget"] is None else f"{r['budget']:.0%}"
        same = f"{r['outputs_equal']}/{r['requests']}" if "outputs_equal" in r else "reference"
        print(f"| {r['stream']} | {budget} | {r['policy']} | {r['blocks']} | {r['hit_rate']:.1%} | "
              f"{r['prefill_tokens']:,} | {r['evictions']:,} | {r.get('cut', '-')} | {r['preemptions']} | "
              f"{r['wall_s']:.1f} | "
              f"{r['requests_per_hour']:,.0f} | {same} |")
    print()
    for (stream, budget) in dict.fromkeys((r["stream"], r["budget"]) for r in rows if r["budget"] not in (None, 1.0)):
        cell = sorted((r["prefill_tokens"], r["policy"]) for r in rows
                      if r["stream"] == stream and r["budget"] == budget)
        best = cell[0][0]
        winners = [p for t, p in cell if t == best]
        others = ", ".join(f"{p} +{(t - best) / best:.1%}" for t, p in cell if t != best)
        print(f"{stream} at {budget:.0%}: fewest prompt tokens {' = '.join(winners)} ({best:,}); {others or 'all equal'}")
    if plot_path:
        plot(rows, plot_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="float32: outputs must equal the ample run's")
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=STREAMS)
    ap.add_argument("--policies", nargs="+", default=sorted(POLICIES), choices=sorted(POLICIES))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5, 1.0],
                    help="KV budgets as fractions of each stream's working set")
    ap.add_argument("--size", type=int, nargs="+", default=[24, 4, 6, 16],
                    help="in this order: requests (server), problems (tree), conversations (chat), problems (batch)")
    ap.add_argument("--gap", type=float, default=24.0, help="mean engine steps between arrivals (server, chat)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG: prompt tokens computed against budget, per stream")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only print the table (Markdown) of saved runs")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.plot)
        return
    defaults = ap.get_default("size")
    sizes = dict(zip(STREAMS, args.size + defaults[len(args.size):]))

    lm = load(args.model, dtype=args.dtype)
    problems = gsm8k_sample(36)
    block_bytes = Solver(lm, kv_budget=1 << 24).engine.runner.block_bytes
    rows = []
    print(f"{'stream':7s} {'policy':6s} {'budget':>6s} {'blocks':>6s} {'hit rate':>8s} {'prefill tok':>11s} "
          f"{'evict':>6s} {'cut':>5s} {'preempt':>7s} {'wall s':>7s} {'req/h':>7s} {'errors':>6s} {'same':>5s}",
          flush=True)
    for name in args.streams:
        stream = build(name, problems, sizes[name], args.gap, args.seed, args.new_tokens)
        ample, run = measure(lm, stream, args.policies[0], (4 << 30) // block_bytes, block_bytes, args.new_tokens,
                             None)
        assert ample["evictions"] == 0, "the ample pool evicted: raise its budget"
        working = run.peak_blocks
        reference = run.outputs
        ample.update(policy="ample", budget=None, working_set_blocks=working)
        rows.append(ample)
        _print(ample)
        for b, budget in enumerate(args.budgets):
            order = args.policies[b % len(args.policies):] + args.policies[:b % len(args.policies)]
            for policy in order:
                row, _ = measure(lm, stream, policy, max(int(budget * working), 1), block_bytes, args.new_tokens,
                                 reference)
                row.update(budget=budget, working_set_blocks=working)
                rows.append(row)
                _print(row)
    if args.plot:
        plot(rows, args.plot)
    finish({"model": args.model, "dtype": args.dtype, "block_bytes": block_bytes, "gap_steps": args.gap,
            "new_tokens": args.new_tokens, "sizes": sizes, "rows": rows}, args.out)


def _print(r: dict) -> None:
    budget = "ample" if r["budget"] is None else f"{r['budget']:.0%}"
    same = f"{r['outputs_equal']}/{r['requests']}" if "outputs_equal" in r else "ref"
    print(f"{r['stream']:7s} {r['policy']:6s} {budget:>6s} {r['blocks']:6d} {r['hit_rate']:8.1%} "
          f"{r['prefill_tokens']:11d} {r['evictions']:6d} {r['cut']:5d} {r['preemptions']:7d} {r['wall_s']:7.1f} "
          f"{r['requests_per_hour']:7.0f} {r['errors']:6d} {same:>5s}", flush=True)


if __name__ == "__main__":
    main()
