"""The same GSM8K problems solved three ways, answers compared and wall times side by side:

- local:   `rksc solve --file F` (one process, the engine),
- backend: `rksc solve --file F --backend URL` against `rksc serve` on 127.0.0.1 (started first;
           its load time is reported apart, since a server is loaded once for many jobs),
- ray:     `rksc solve --file F --ray` on a local Ray cluster (its actors load the model inside
           the timed command).

Each wall time is the whole command as a user runs it (process start, tokenizer or model load,
solving, writing the results). On this 2-core machine the modes cannot be faster than local by
much: they show that the programs run unchanged and give the same answers; their speed is what
a bigger server or cluster changes.

    python benchmarks/scaleout.py --limit 20 --out benchmarks/results/scaleout-qwen05.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rksc.bench.datasets import load_problems

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish  # noqa: E402

RKSC = [sys.executable, "-m", "rksc.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    t = time.perf_counter()
    proc = subprocess.Popen(RKSC + ["serve", "--model", model, "--dtype", dtype, "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rksc serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, time.perf_counter() - t
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"rksc serve did not become healthy in 300 s; see {log}")


def run(mode: str, argv: list[str], out: Path, log: Path) -> dict:
    print(f"{mode}: {shlex.join(argv)}", file=sys.stderr)
    t = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print(f"{mode}: exit {code}, {wall:.1f} s, {len(records)} results", file=sys.stderr)
    return {"exit": code, "wall_s": round(wall, 2), "records": records, "command": shlex.join(argv)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--branches", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4, help="problems in flight (each mode)")
    p.add_argument("--modes", default="local,backend,ray")
    p.add_argument("--ray-args", default="--ray --ray-workers 2 --threads 1",
                   help="the flags that put `rksc solve` on a local Ray cluster")
    p.add_argument("--work", default="runs/scaleout", help="folder for the problem file, outputs and logs")
    p.add_argument("--out", default=None, help="summary JSON")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    problems = load_problems("gsm8k", args.offset, args.limit)
    file = work / "problems.jsonl"
    file.write_text("".join(json.dumps({"id": q.id, "question": q.question, "answer": q.gold}) + "\n"
                            for q in problems))
    common = ["solve", "--file", str(file), "--model", args.model, "--branches", str(args.branches),
              "--max-new-tokens", str(args.max_new_tokens), "--concurrency", str(args.concurrency)]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results, server_load = {}, None
    for mode in modes:
        out = work / f"{mode}.jsonl"
        out.unlink(missing_ok=True)  # a fresh run, not a resumed one
        argv = RKSC + common + ["--out", str(out)]
        if mode == "local":
            results[mode] = run(mode, argv + ["--dtype", args.dtype], out, work / f"{mode}.log")
        elif mode == "backend":
            port = free_port()
            server, server_load = start_server(args.model, args.dtype, port, work / "server.log")
            try:
                results[mode] = run(mode, argv + ["--backend", f"http://127.0.0.1:{port}/v1"], out,
                                    work / f"{mode}.log")
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(60)
        elif mode == "ray":
            results[mode] = run(mode, argv + ["--dtype", args.dtype] + shlex.split(args.ray_args), out,
                                work / f"{mode}.log")
        else:
            raise SystemExit(f"unknown mode {mode}")
    answers = {m: {r["line"]: r.get("answer") for r in res["records"] if "answer" in r} for m, res in results.items()}
    correct = {m: sum(bool(r.get("correct")) for r in res["records"]) for m, res in results.items()}
    base = modes[0]
    summary = {
        "model": args.model, "dtype": args.dtype, "problems": len(problems), "offset": args.offset,
        "branches": args.branches, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
        "server_load_s": round(server_load, 2) if server_load is not None else None,
        "modes": {m: {"wall_s": res["wall_s"], "exit": res["exit"], "solved": len(answers[m]),
                      "correct": correct[m], "command": res["command"],
                      f"same_answer_as_{base}": sum(answers[m].get(k) == v for k, v in answers[base].items())}
                  for m, res in results.items()},
        "per_problem": [{"line": k, **{m: answers[m].get(k) for m in modes}, "gold": problems[k - 1].gold}
                        for k in sorted(answers[base])],
    }
    print(f"\n{'mode':<8} {'wall s':>8} {'solved':>7} {'correct':>8} {'same answer as ' + base:>22}")
    for m, row in summary["modes"].items():
        print(f"{m:<8} {row['wall_s']:>8.1f} {row['solved']:>7} {row['correct']:>8} "
              f"{row[f'same_answer_as_{base}']:>22}")
    if server_load is not None:
        print(f"(rksc serve took {server_load:.1f} s to load before the backend run; not in its wall time)")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
