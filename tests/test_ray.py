"""Fan-out over Ray and resumable --out: a local Ray cluster of two nodes solving a small file gives
the single-process run's answers and token ids, also when a worker is killed mid-batch; a rerun with
the same --out solves only what is missing; without Ray, --ray says how to get it."""

import json
import sys
from pathlib import Path

import pytest

from conftest import problems_file, run
from rksc.cli import main
from rksc.cluster.ray import MISSING, placement, shards
from rksc.errors import RkscError

SOLVE = ["--model", "smollm2-135m", "--dtype", "float32", "--threads", "1", "-b", "3", "-n", "24"]


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def same_solves(a: list[dict], b: list[dict]) -> None:
    assert [r["line"] for r in a] == [r["line"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert ("error" in x) == ("error" in y)
        if "error" in x:
            continue
        assert (x["answer"], x["chosen"], x["correct"]) == (y["answer"], y["chosen"], y["correct"])
        assert [br["prompt_ids"] for br in x["branches"]] == [br["prompt_ids"] for br in y["branches"]]
        assert [br["token_ids"] for br in x["branches"]] == [br["token_ids"] for br in y["branches"]]
        assert [br["verifier"] for br in x["branches"]] == pytest.approx([br["verifier"] for br in y["branches"]],
                                                                         abs=1e-4)


# ---- without a cluster ----

def test_placement_is_one_worker_per_node_or_per_threads_cores_or_as_many_as_asked():
    assert placement({"a": 8, "b": 4}) == [("a", 8), ("b", 4)]
    assert placement({"a": 8, "b": 4}, threads=4) == [("a", 4), ("b", 4), ("a", 4)]
    assert placement({"a": 2}, workers=2) == [("a", 1), ("a", 1)]
    assert placement({"a": 1, "b": 1, "c": 0}, workers=2) == [("a", 1), ("b", 1)]
    assert placement({"a": 4, "b": 4}, workers=3, threads=2) == [("a", 2), ("b", 2), ("a", 2)]
    with pytest.raises(RkscError, match="no room for 3 worker"):
        placement({"a": 1, "b": 1}, workers=3)
    with pytest.raises(RkscError, match="no room for 1 worker.* of 4 thread"):
        placement({"a": 2}, threads=4)


def test_shards_are_contiguous_and_cover_the_range():
    assert shards(10, 5, 2) == [(10, 3), (13, 2)]
    assert shards(0, 1, 4) == [(0, 1)]
    assert shards(3, 6, 3) == [(3, 2), (5, 2), (7, 2)]


def test_without_ray_the_flag_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    problems = problems_file(tmp_path)
    for argv in (["solve", "--file", problems, "--ray"], ["solve", "--file", problems, "--ray", "auto"],
                 ["bench", "--ray", "--out", tmp_path / "bench"]):
        code, out, err = run(capsys, *argv)
        assert (code, out, err) == (2, "", f"rksc: error: {MISSING}\n")
    assert MISSING == "--ray needs Ray: pip install 'rksc[ray]'"


def test_ray_flag_mistakes_are_one_line(capsys, tmp_path):
    problems = problems_file(tmp_path)
    for argv, message in ((["solve", "2+2?", "--ray"], "--ray is for --file runs"),
                          (["solve", "--file", problems, "--ray-workers", "2"], "--ray-workers needs --ray"),
                          (["solve", "--file", problems, "--ray", "--ray-workers", "0"], "ray-workers must be at least 1"),
                          (["solve", "--file", problems, "--ray", "--cache", "none"], "--ray runs on the block pool")):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


# ---- on a local Ray cluster of two nodes ----

@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """--threads 1 in this process sets torch's threads for the tests that follow: put them back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_address():
    """A real Ray cluster on this machine: a head and a second node, one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The file solved in this process, on one engine: the reference."""
    tmp = tmp_path_factory.mktemp("single")
    problems = problems_file(tmp)
    assert main([str(a) for a in ["solve", "--file", problems, "--out", tmp / "out.jsonl", *SOLVE]]) == 2
    return records(tmp / "out.jsonl")


@pytest.mark.slow
def test_two_ray_workers_solve_a_file_as_one_process_does(capsys, tmp_path, ray_address, single_process):
    problems = problems_file(tmp_path)
    code, _, err = run(capsys, "solve", "--file", problems, "--out", tmp_path / "ray.jsonl", "--ray", ray_address,
                       *SOLVE)
    assert code == 2 and f"{problems}:3: not valid JSON" in err  # the bad line, reported as without Ray
    assert "solved 5 of 6 problems (2 Ray worker(s) on 2 node(s), 1 thread(s) each, 3 in flight each)" in err
    same_solves(records(tmp_path / "ray.jsonl"), single_process)


@pytest.mark.slow
def test_rerun_with_the_same_out_solves_only_what_is_missing(capsys, tmp_path, ray_address, single_process):
    problems = problems_file(tmp_path)
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in single_process]
    # line 1 missing, 2 and 4 done, the error of line 3 dropped, line 5 cut short mid-write by a crash
    out.write_text(lines[1] + "\n" + lines[3] + "\n" + lines[4][:500])
    code, _, err = run(capsys, "solve", "--file", problems, "--out", out, "--ray", ray_address, *SOLVE)
    assert code == 2 and "already holds results for 2 of 6 lines; solving the other 4" in err
    assert "solved 5 of 6 problems (2 in an earlier run" in err
    got = records(out)
    same_solves(got, single_process)
    assert got[1] == single_process[1] and got[3] == single_process[3]  # kept as they were


@pytest.mark.slow
def test_bench_on_two_ray_workers_pools_the_shards_as_one_run(capsys, tmp_path, ray_address):
    common = ["bench", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1", "--limit", "3",
              "--conditions", "prefix,rksc", "--regime", "natural", "-n", "8", "-b", "2", "--warmup", "0",
              "--no-plots"]
    assert run(capsys, *common, "--out", tmp_path / "one")[0] == 0
    code, out, _ = run(capsys, *common, "--out", tmp_path / "ray", "--ray", ray_address)
    assert code == 0 and "cluster: 2 Ray worker(s) on 2 node(s)" in out
    one, ray = records(tmp_path / "one" / "results.jsonl"), records(tmp_path / "ray" / "results.jsonl")
    key = ("condition", "index", "problem", "answer", "branch_answers", "branch_tokens")
    assert sorted(tuple(json.dumps(r[k]) for k in key) for r in one) == sorted(
        tuple(json.dumps(r[k]) for k in key) for r in ray)
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["cluster"]["workers"] == 2
    assert [(r["offset"], r["limit"]) for r in summary["runs"]] == [(0, 2), (2, 1)]
    assert summary["config"]["limit"] == 3 and summary["answer_agreement"]["prefix|rksc"] is not None
    for k in (0, 1):
        assert (tmp_path / "ray" / f"shard-{k}" / "results.jsonl").is_file()


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_problem_and_repeats_none(capsys, tmp_path, ray_address, single_process):
    import os
    import signal
    import time

    from rksc.cli import build_parser
    from rksc.cli.batch import gold, read_problems
    from rksc.cli.solve import config as solve_config
    from rksc.cluster.ray import Workers

    problems = problems_file(tmp_path)
    args = build_parser().parse_args(["solve", "--file", str(problems), *SOLVE])  # the CLI's settings
    config, kwargs = solve_config(args), {k: getattr(args, k) for k in ("model", "dtype", "weights", "threads",
                                                                          "kv_budget", "block_size", "evict")}
    rows = [(n, item) for n, item, _ in read_problems(str(problems)) if item is not None]
    items = [{"question": item["question"], "gold": gold(item)} for _, item in rows]
    workers = Workers.start(ray_address, kwargs, 2)
    try:
        pids = workers.ray.get([a.pid.remote() for a in workers.actors])  # before run() keeps them busy
        got = []
        for index, result in workers.solve_many(items, config, 1):  # one in flight each, three queued
            got.append((index, result))
            if len(got) == 1:  # kill one once both have taken their second problem (a solve takes seconds)
                while workers._queue.qsize() > len(items) - 4:
                    time.sleep(0.01)
                os.kill(pids[1], signal.SIGKILL)
        err = capsys.readouterr().err
        assert workers.requeued >= 1  # the kill was mid-batch: the dead worker had problems not yet returned
        assert [index for index, _ in got] == [0, 1, 2, 3, 4]
        assert not any(isinstance(result, RkscError) for _, result in got)
        solved = {n: {"line": n, **json.loads(json.dumps(result.to_dict()))} for (n, _), (_, result) in zip(rows, got)}
        same_solves([solved.get(r["line"], r) for r in single_process], single_process)  # the bad line: as is
        assert err.count("rksc: a Ray worker died (") == 1 and "; its problems go to the 1 worker(s) left\n" in err
        assert workers.describe() == "1 Ray worker(s) on 1 node(s) after 1 died, 1 thread(s) each"
        assert workers.prefix_stats()[1] > 0
        os.kill(workers.ray.get(workers.actors[0].pid.remote()), signal.SIGKILL)  # the last one
        with pytest.raises(RkscError, match=r"^every Ray worker died: .+$") as died:
            list(workers.solve_many(items[:1], config, 1))
        assert "\n" not in str(died.value) and workers.actors == []
    finally:
        workers.close()


@pytest.mark.slow
def test_ray_workers_pass_the_api_key_to_a_keyed_backend(capsys, tmp_path, ray_address, smollm2):
    from conftest import running
    from rksc.server.config import ServerConfig

    problems = problems_file(tmp_path)
    with running(ServerConfig(model="smollm2-135m", kv_budget=64 << 20, api_key="sk-ray"), lambda: smollm2) as (url, _):
        common = ["solve", "--file", problems, "--model", "smollm2-135m", "--backend", url + "/v1", "-b", "2",
                  "-n", "8", "--ray", ray_address]
        code, _, err = run(capsys, *common, "--api-key", "sk-ray", "--out", tmp_path / "keyed.jsonl")
        assert code == 2 and "solved 5 of 6 problems (2 Ray worker(s)" in err  # line 3 is not JSON
        got = records(tmp_path / "keyed.jsonl")
        assert [r["line"] for r in got] == [1, 2, 3, 4, 5, 6]
        assert all(len(r["branches"]) == 2 for r in got if r["line"] != 3)
    # without the key the server answers 401: test_server's api-key test checks that --backend says so
