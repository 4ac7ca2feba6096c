"""Benchmark harness: schedule, statistics, schema, and that the exact baselines agree."""

import json
from dataclasses import replace

import numpy as np
import pytest

from rksc.bench import stats
from rksc.bench.conditions import CONDITIONS, schedule
from rksc.bench.harness import BenchConfig, filler_for, run_bench
from rksc.errors import RkscError


def test_schedule_interleaves_conditions_per_problem_or_per_block():
    assert schedule(3, ["a", "b", "c"]) == [([0], "a"), ([0], "b"), ([0], "c"), ([1], "a"), ([1], "b"), ([1], "c"),
                                           ([2], "a"), ([2], "b"), ([2], "c")]
    assert schedule(5, ["a", "b"], block=2) == [([0, 1], "a"), ([0, 1], "b"), ([2, 3], "a"), ([2, 3], "b"),
                                                ([4], "a"), ([4], "b")]


def test_speedup_is_ratio_of_means_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    base = rng.uniform(9, 11, 40)
    fast = base / 3 + rng.normal(0, 0.05, 40)
    s = stats.speedup(base.tolist(), fast.tolist())
    assert s.ratio == pytest.approx(base.mean() / fast.mean())
    assert s.low < s.ratio < s.high and 2.8 < s.low and s.high < 3.2
    assert s.p_value is not None and s.p_value < 1e-6 and s.n == 40


def test_speedup_of_identical_latencies_is_one_without_a_test():
    s = stats.speedup([2.0, 3.0, 4.0], [2.0, 3.0, 4.0])
    assert s.ratio == s.low == s.high == 1.0 and s.p_value is None


def test_speedup_rejects_unpaired_input():
    with pytest.raises(ValueError):
        stats.speedup([1.0, 2.0], [1.0])


def test_conditions_not_built_are_unavailable_not_faked():
    assert CONDITIONS["naive"].available and CONDITIONS["prefix"].available
    assert not CONDITIONS["cgee-only"].available  # early exit runs on the engine only
    assert CONDITIONS["cgee-only"].missing == ["cgee-without-sharing"]
    assert CONDITIONS["cgee"].available and CONDITIONS["cgee"].early_stop == ("cgee",)
    assert CONDITIONS["rksc"].early_stop == () and not CONDITIONS["rksc"].missing


def test_bad_bench_config_is_a_user_error():
    with pytest.raises(RkscError, match="unknown condition"):
        BenchConfig(conditions=("naive", "fast"))
    with pytest.raises(RkscError, match="unknown dataset"):
        BenchConfig(dataset="gpqa")


@pytest.mark.slow
def test_filler_brings_the_prefix_near_the_target(smollm2):
    from rksc.reasoning.solver import Solver

    solver = Solver(smollm2)
    q = "Janet has 3 apples and buys 4 more. How many apples does she have?"
    context = filler_for(solver, q, 300)
    n = len(solver.prompts.layout(q, context).prefix.ids)
    assert 290 <= n <= 302 and q in solver.prompts.layout(q, context).prefix.text


@pytest.mark.slow
def test_naive_nokv_prefix_same_schema_and_same_answers_under_greedy(smollm2, tmp_path):
    from rksc.reasoning.solver import Solver

    config = BenchConfig(model="smollm2-135m", dtype="float32", limit=2, branches=2, max_new_tokens=12,
                         prefix_tokens=160, conditions=("naive", "nokv", "prefix", "cgee-only"), warmup=0,
                         resamples=200, out=str(tmp_path))
    summary = run_bench(config, solver=Solver(smollm2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["condition"] for r in records] == ["naive", "nokv", "prefix"] * 2
    assert len({tuple(sorted(r)) for r in records}) == 1  # one schema for every condition
    assert summary["unavailable"] == {"cgee-only": "needs cgee-without-sharing (not built)"}
    for i in range(2):
        same = [r for r in records if r["index"] == i]
        assert len({r["answer"] for r in same}) == 1
        assert len({tuple(r["branch_answers"]) for r in same}) == 1
        assert same[0]["prefix_tokens"] == same[2]["prefix_tokens"] >= 150
    assert summary["answer_agreement"] == {"naive|nokv": 1.0, "naive|prefix": 1.0, "nokv|prefix": 1.0}
    per = summary["per_condition"]
    assert set(per["prefix"]["speedup_vs_naive"]) == {"ratio", "low", "high", "p_value", "n"}
    assert "speedup_vs_naive" not in per["naive"]


@pytest.mark.slow
def test_pool_conditions_start_cold_so_no_run_reuses_another_runs_kv(smollm2, tmp_path):
    from rksc.reasoning.solver import Solver

    config = BenchConfig(model="smollm2-135m", limit=2, branches=2, max_new_tokens=4, prefix_tokens=120,
                         conditions=("rksc", "kv-only"), warmup=0, resamples=50, out=str(tmp_path))
    run_bench(config, solver=Solver(smollm2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["kv_bytes"].get("prefix_cached_tokens", 0) == 0 for r in records)


@pytest.mark.slow
def test_engine_conditions_run_problems_in_flight_and_report_throughput(smollm2, tmp_path):
    from rksc.reasoning.solver import Solver

    config = BenchConfig(model="smollm2-135m", limit=3, branches=2, max_new_tokens=6, regime="natural",
                         conditions=("prefix", "rksc"), warmup=0, resamples=50, out=str(tmp_path), concurrency=2)
    summary = run_bench(config, solver=Solver(smollm2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    # blocks of 2K = 4 problems: prefix runs its block one at a time, rksc with 2 in flight
    assert [(r["condition"], r["index"]) for r in records] == [("prefix", i) for i in range(3)] + [
        ("rksc", i) for i in range(3)]
    assert {r["concurrency"] for r in records if r["condition"] == "rksc"} == {2}
    per = summary["per_condition"]
    assert per["rksc"]["concurrency"] == 2 and per["prefix"]["concurrency"] == 1
    for c in ("prefix", "rksc"):
        assert per[c]["problems_per_hour"] == pytest.approx(3 * 3600 / per[c]["wall_s"])


@pytest.mark.slow
def test_early_exit_conditions_report_savings_against_rksc_and_respect_the_calibration_split(smollm2, tmp_path):
    from rksc.reasoning import early, profiles
    from rksc.reasoning.solver import Solver

    solver = Solver(smollm2)
    config = BenchConfig(model="smollm2-135m", limit=2, branches=4, max_new_tokens=24, regime="natural",
                         conditions=("rksc", "exact", "beta"), warmup=0, resamples=50, out=str(tmp_path))
    solver._profile = None  # no profile: exact and beta run on their defaults
    summary = run_bench(config, solver=solver, progress=False)
    per = summary["per_condition"]
    assert per["rksc"]["early"] is None and "vs_rksc" not in per["rksc"]
    for c in ("exact", "beta"):
        v = per[c]["vs_rksc"]
        assert v["n"] == 2 and 0 <= v["disagree"] <= 2 and 0 < v["disagree_bound"] <= 1
        assert per[c]["early"]["stop_reasons"] and per[c]["tokens_per_problem"] <= per["rksc"]["tokens_per_problem"]
    # the full runs of rksc replayed under each policy: exact never changes the answer
    assert per["exact"]["replay_vs_rksc"]["disagree"] == 0 and per["exact"]["replay_vs_rksc"]["n"] == 2
    assert per["beta"]["replay_vs_rksc"]["policies"] == ["beta"]
    assert len((tmp_path / "traces_rksc.jsonl").read_text().splitlines()) == 2
    # a profile calibrated on these very problems is refused
    solver._profile = profiles.Profile("smollm2-135m", ("exact", "confidence"), early.Thresholds(),
                                       {"dataset": "gsm8k", "split": [1, 300], "calibrated": ["confidence"]})
    bad = BenchConfig(model="smollm2-135m", limit=2, branches=2, max_new_tokens=4, regime="natural",
                      conditions=("rksc", "cgee"), warmup=0, out=str(tmp_path / "bad"))
    with pytest.raises(RkscError, match="overlap the calibration split"):
        run_bench(bad, solver=solver, progress=False)
    # ... and so is one whose testing order was learnt on them
    solver._profile.calibration.update(split=[500, 799], order={"split": [0, 1], "n": 2})
    with pytest.raises(RkscError, match="overlap the calibration split 0-1"):
        run_bench(bad, solver=solver, progress=False)


@pytest.mark.slow
def test_gates_with_thresholds_set_by_hand_report_the_layer_exit(smollm2, tmp_path):
    from rksc.reasoning.solver import Solver

    solver = Solver(smollm2)
    solver._profile = None
    config = BenchConfig(model="smollm2-135m", limit=2, branches=2, max_new_tokens=6, regime="natural",
                         conditions=("rksc", "gates"), warmup=0, resamples=50, out=str(tmp_path / "refused"))
    # uncalibrated gates are refused before anything runs
    with pytest.raises(RkscError, match="--thresholds"):
        run_bench(config, solver=solver, progress=False)
    assert not (tmp_path / "refused").exists()
    # every question exits at its first layer: the others are not run, and the summary counts them
    hand = replace(config, out=str(tmp_path / "run"), thresholds="exit_margin=0,exit_patience=1,skip_margin=1000000")
    summary = run_bench(hand, solver=solver, progress=False)
    le = summary["per_condition"]["gates"]["early"]["layer_exit"]
    assert le["questions"] == 4 and le["exited"] == 4 and le["mean_exit_layer"] == 0
    assert le["layers_skipped"] == 4 * (solver.engine.runner.layers - 1)
    assert summary["config"]["thresholds"] == {"exit_margin": 0.0, "exit_patience": 1, "skip_margin": 1000000}
    assert "replay_vs_rksc" not in summary["per_condition"]["gates"]  # rksc's runs have no lens readings
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert all(r["early"]["by_hand"] == ["exit_margin", "exit_patience", "skip_margin"]
               for r in records if r["condition"] == "gates")


@pytest.mark.slow
def test_runs_made_one_after_another_pool_as_one_run_and_pooling_twice_lists_the_parts(smollm2, tmp_path):
    from rksc.bench.combine import combine, load_run, save_run
    from rksc.reasoning.solver import Solver

    solver = Solver(smollm2)
    base = BenchConfig(model="smollm2-135m", branches=2, max_new_tokens=6, regime="natural",
                       conditions=("prefix", "rksc"), warmup=0, resamples=50, concurrency=1)

    def bench(out, **changes):  # as `rksc bench` leaves a run: results.jsonl and summary.json
        summary = run_bench(replace(base, out=str(out), **changes), solver=solver, progress=False)
        (out / "summary.json").write_text(json.dumps(summary))

    for offset, limit in ((1, 2), (3, 1), (4, 1)):  # from offset 1: indices stay relative to the first run's
        bench(tmp_path / f"r{offset}", offset=offset, limit=limit)
    names = [str(tmp_path / f"r{o}") for o in (1, 3, 4)]
    direct = combine([load_run(n) for n in names], names)
    save_run(tmp_path / "first", combine([load_run(n) for n in names[:2]], names[:2]))
    again = combine([load_run(tmp_path / "first"), load_run(names[2])], [str(tmp_path / "first"), names[2]])
    for summary, records, _ in (direct, again):
        assert summary["problems"] == 4 and summary["config"]["offset"] == 1 and summary["config"]["limit"] == 4
        assert sorted((r["condition"], r["index"]) for r in records) == [(c, i) for c in ("prefix", "rksc")
                                                                         for i in range(4)]
        assert [(r["offset"], r["limit"]) for r in summary["runs"]] == [(1, 2), (3, 1), (4, 1)]
    assert again[1] == direct[1] and again[0]["per_condition"] == direct[0]["per_condition"]
    with pytest.raises(RkscError, match="more than one run"):
        combine([load_run(tmp_path / "first"), load_run(names[1])], ["first", names[1]])
    bench(tmp_path / "r5", offset=5, limit=1, branches=3)
    with pytest.raises(RkscError, match="settings differ"):
        combine([load_run(names[0]), load_run(tmp_path / "r5")], [names[0], "r5"])
