"""Fan-out over a Ray cluster: `rksc solve --file F --ray [ADDRESS]` and `rksc bench --ray`.

One worker (a Ray actor) per node, or one per `threads` cores, holds a Solver loaded once from the
solver's keyword arguments as given (model, dtype, kv_budget, ...; `threads` is set per worker).
Solving, the problems wait in one queue and each worker's engine takes the next one whenever it
has room for another (`concurrency` in flight), so a faster worker takes more and no engine idles
while work remains; results stream back as they finish and come out in input order, as from
Solver.solve_many. A worker that dies mid-batch (its process killed, its node lost) is dropped
with one line on stderr; the problems it had taken and not returned are queued again once the
others have emptied the queue, so the batch finishes on the workers left and each problem still
comes out exactly once. Only when every worker has died does the run end (one line; a rerun with
the same --out resumes). Benchmarking, each worker runs every condition on its own contiguous
shard of the problems (the harness interleaves conditions per block) and the shards are pooled; a
worker that dies there ends the run.

Ray is optional (`pip install 'rksc[ray]'`): this module imports without it, and `require` says
how to get it. Every node needs rksc installed; registry models are prepared where missing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from rksc.errors import RkscError

MISSING = "--ray needs Ray: pip install 'rksc[ray]'"


class WorkerDied(RkscError):
    """A Ray worker's process or node is gone; `reason` is the first line of Ray's account."""

    def __init__(self, reason: str):
        super().__init__(f"a Ray worker died: {reason}")
        self.reason = reason


def require():
    """The ray module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RkscError(MISSING) from None
    return ray


def disconnect() -> None:
    """Leave the Ray cluster if this process joined one; a local cluster started for the run stops
    with it (on Ctrl-C, whose exit skips Ray's own clean-up and would orphan its processes)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def placement(cpus: dict[str, int], workers: int | None = None, threads: int | None = None) -> list[tuple[str, int]]:
    """(node, threads) for each worker, given each node's cores. By default one worker per node using
    all its cores; with `threads`, one worker per `threads` cores; with `workers`, that many, spread
    over the nodes in turn (each with `threads` cores, or an equal share of the cluster's)."""
    cpus = {node: n for node, n in cpus.items() if n >= 1}
    if workers is None and threads is None:
        if not cpus:
            raise RkscError("the Ray cluster has no node with a CPU")
        return list(cpus.items())
    threads = threads or max(1, sum(cpus.values()) // workers)
    slots = {node: n // threads for node, n in cpus.items()}
    workers = workers or sum(slots.values())
    if workers < 1 or workers > sum(slots.values()):
        raise RkscError(f"the Ray cluster has {sum(cpus.values())} CPUs on {len(cpus)} node(s) "
                        f"({', '.join(map(str, cpus.values())) or 'none'}): no room for {workers or 1} worker(s) "
                        f"of {threads} thread(s); lower --ray-workers or --threads")
    plan = []
    while len(plan) < workers:
        for node in slots:
            if slots[node] and len(plan) < workers:
                plan.append((node, threads))
                slots[node] -= 1
    return plan


def shards(offset: int, limit: int, parts: int) -> list[tuple[int, int]]:
    """`limit` problems from `offset` as at most `parts` contiguous (offset, limit) ranges of near-equal size."""
    parts = min(parts, limit)
    sizes = [limit // parts + (k < limit % parts) for k in range(parts)]
    starts = [offset + sum(sizes[:k]) for k in range(parts)]
    return list(zip(starts, sizes))


class Worker:
    """What one Ray actor runs: a Solver, loaded once; problems pulled from a shared queue."""

    def __init__(self, solver_kwargs: dict):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        from rksc.reasoning.solver import Solver  # torch loads in the worker, not with require()

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.solver, self.error = None, None
        try:
            self.solver = Solver.open(**solver_kwargs)
        except RkscError as e:  # reported by ready(), as the one-line error it is
            self.error = e

    def ready(self) -> RkscError | None:
        return self.error

    def run(self, queue, config, concurrency: int) -> Iterator[tuple[int, object]]:
        """(index, SolveResult or RkscError) for each problem this worker took, as each finishes."""
        from ray.util.queue import Empty

        taken = []  # the queue's indices, in the order this worker took them

        def pull():  # called by the engine whenever it has room for another problem
            while True:
                try:
                    index, item = queue.get_nowait()
                except Empty:
                    return
                taken.append(index)
                yield item

        for local, result in self.solver.solve_many(pull(), config, concurrency):
            yield taken[local], result

    def pid(self) -> int:
        return os.getpid()

    def prefix_stats(self) -> tuple[int, int]:
        return self.solver.prefix_stats()

    def bench(self, config) -> tuple[dict, list[dict], list[dict]]:
        """Run the harness on this worker's shard; its summary, records and rksc traces."""
        from rksc.bench import harness, replay  # bench shards only: solve --ray needs no extra

        with tempfile.TemporaryDirectory(prefix="rksc-bench-") as tmp:
            shard = replace(config, out=tmp)
            summary = harness.run_bench(shard, solver=self.solver, progress=False)
            summary.update(config={**summary["config"], "out": config.out},
                           machine=harness.machine())
            records = [json.loads(line) for line in Path(tmp, "results.jsonl").read_text().splitlines()]
            traces = Path(tmp, "traces_rksc.jsonl")
            traces = replay.load_traces(traces) if traces.is_file() else []
        return summary, records, traces


class Workers:
    """The driver's side: the workers on a Ray cluster, started with `Workers.start`."""

    def __init__(self, ray, connected_here: bool):
        self.ray, self._connected_here = ray, connected_here  # connected here: disconnect in close()
        self.actors: list = []
        self._queue = None  # the work queue of a solve_many in progress
        self.plan: list[tuple[str, int]] = []  # (node, threads) per worker
        self.died = 0  # workers lost (dropped from actors and plan)
        self.requeued = 0  # problems a dead worker had taken, queued again for the others

    @classmethod
    def start(cls, address: str | None, solver_kwargs: dict, workers: int | None = None) -> Workers:
        """Connect (no address: start a local cluster; "auto": the one `ray start` runs here; or an
        address), place the workers, load a Solver in each. `solver_kwargs` go to Solver.load as
        they are; their "threads" (None: all of a node's cores) is each worker's share of cores."""
        ray = require()
        connected_here = not ray.is_initialized()
        if connected_here:
            try:
                if address:
                    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
                else:
                    ray.init(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RkscError(f"cannot connect to the Ray cluster at {address or 'a new local instance'}: "
                                f"{first}") from None
        fleet = cls(ray, connected_here)
        try:
            fleet._place(solver_kwargs, workers)
        except BaseException:
            fleet.close()
            raise
        return fleet

    def _place(self, solver_kwargs: dict, workers: int | None) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n["Alive"]}
        self.plan = placement(cpus, workers, solver_kwargs.get("threads"))
        actor = self.ray.remote(Worker)
        self.actors = [actor.options(num_cpus=threads,
                                     scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                       .remote({**solver_kwargs, "threads": threads}) for node, threads in self.plan]
        error = next((e for e in self._get([a.ready.remote() for a in self.actors]) if e is not None), None)
        if error is not None:
            raise error

    def describe(self) -> str:
        threads = sorted({t for _, t in self.plan})
        nodes = len({node for node, _ in self.plan})
        return (f"{len(self.plan)} Ray worker(s) on {nodes} node(s)"
                f"{f' after {self.died} died' if self.died else ''}, {'/'.join(map(str, threads))} thread(s) each")

    def in_flight(self, concurrency: int, problems: int) -> int:
        """Problems each worker keeps in flight: `concurrency`, or fewer when there are too few
        problems to go round (a worker's engine takes as many as it has room for at once)."""
        return max(1, min(concurrency, -(-problems // len(self.plan))))

    def solve_many(self, problems: Iterable[dict], config, concurrency: int) -> Iterator[tuple[int, object]]:
        """(index, SolveResult or RkscError) in input order, as Solver.solve_many yields them;
        each worker keeps `in_flight(concurrency, ...)` problems in flight. In rounds: the workers
        empty the queue; what a worker that died had taken is queued again for the next round."""
        from ray.util.queue import Queue

        problems = list(problems)
        k = self.in_flight(concurrency, len(problems))
        self._queue = queue = Queue(actor_options={"num_cpus": 0})
        done, upcoming = {}, 0  # results not yet yielded; the next index to yield
        todo = list(range(len(problems)))
        try:
            while todo:
                queue.put_nowait_batch([(i, problems[i]) for i in todo])
                streams = {a.run.remote(queue, config, k): a for a in self.actors}
                while streams:
                    ready, _ = self.ray.wait(list(streams), num_returns=1)
                    for stream in ready:
                        try:
                            index, result = self._get(next(stream))
                        except StopIteration:
                            del streams[stream]
                            continue
                        except WorkerDied as e:
                            self._drop(streams.pop(stream), e.reason)
                            continue
                        done[index] = result
                    while upcoming in done:
                        yield upcoming, done.pop(upcoming)
                        upcoming += 1
                todo = [i for i in range(upcoming, len(problems)) if i not in done]  # taken by the dead
                self.requeued += len(todo)
        finally:  # also reached when the caller drops this generator: close() may have been first
            self._drop_queue()

    def _drop(self, actor, reason: str) -> None:
        """Forget a worker that died (and kill it, in case it was only unreachable); none left, the run ends."""
        k = self.actors.index(actor)
        del self.actors[k], self.plan[k]
        self.died += 1
        self.ray.kill(actor)
        if not self.actors:
            raise RkscError(f"every Ray worker died: {reason}")
        from tqdm import tqdm

        tqdm.write(f"rksc: a Ray worker died ({reason}); its problems go to the {len(self.actors)} worker(s) left",
                   file=sys.stderr)

    def _drop_queue(self) -> None:
        if self._queue is not None:
            self._queue.shutdown(force=True)
            self._queue = None

    def prefix_stats(self) -> tuple[int, int]:
        """Prompt tokens the workers' prefix indexes reused, of those looked up."""
        stats = self._get([a.prefix_stats.remote() for a in self.actors])
        return sum(h for h, _ in stats), sum(q for _, q in stats)

    def bench(self, config) -> list[tuple[dict, list[dict], list[dict]]]:
        """The harness on contiguous shards of config's problems, one shard per worker."""
        ranges = shards(config.offset, config.limit, len(self.actors))
        return self._get([a.bench.remote(replace(config, offset=offset, limit=limit))
                          for a, (offset, limit) in zip(self.actors, ranges)])

    def _get(self, refs):
        """ray.get, with a user error raised on a worker as that error and a lost worker as one line."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RkscError):
                raise RkscError(str(e.cause)) from None
            raise
        except self.ray.exceptions.RayActorError as e:
            raise WorkerDied((str(e).strip().splitlines() or ["no reason given"])[0]) from None

    def close(self) -> None:
        self._drop_queue()
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self._connected_here:
            self.ray.shutdown()
