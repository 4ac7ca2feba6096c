"""ASKS's answer guard: the bound's arithmetic, fixed-sequence testing over recorded answers, a real
walk on the engine that resumes from its records, and `--asks auto` following the calibration."""

import json

import pytest

from rksc.bench import asks_guard
from rksc.bench.replay import clopper_pearson_upper
from rksc.reasoning import profiles


def test_the_bound_allows_no_change_below_299_problems_and_a_few_above():
    assert asks_guard.min_problems() == 299
    assert asks_guard.max_changes(298) == -1 and asks_guard.max_changes(299) == 0
    for n in (300, 600, 1000):
        k = asks_guard.max_changes(n)
        assert clopper_pearson_upper(k, n) <= 0.01 < clopper_pearson_upper(k + 1, n)
    assert asks_guard.max_changes(1000) >= 3


def test_answers_change_only_when_they_differ_as_answers():
    assert not asks_guard.changed("3", "3.0") and not asks_guard.changed(None, None)
    assert asks_guard.changed("3", "4") and asks_guard.changed(None, "4") and asks_guard.changed("4", None)


def test_fixed_sequence_walk_stops_at_the_first_failure_and_keeps_the_last_pass():
    n = 300
    reference = {i: str(i) for i in range(n)}
    reused = [None, {"reused": True}, {"reused": False}]
    same = {i: (str(i), reused) for i in range(n)}
    path = ((0.9, 0.5), (0.9, 0.3), (0.9, 0.15), (0.0, 0.15))
    one_change = {**same, 7: ("x", reused)}
    answers = {path[0]: same, path[1]: same, path[2]: one_change, path[3]: same}
    trials = asks_guard.walk(reference, answers, n, path=path)
    assert [t.status for t in trials] == ["passed", "passed", "failed"]  # the fourth is never tested
    assert trials[2].changed == 1 and trials[2].changed_problems == [7] and trials[2].n == n
    best = asks_guard.chosen(trials)
    assert (best.tau, best.recompute) == (0.9, 0.3) and best.bound() <= 0.01
    assert best.prompts == 2 * n and best.reused == n
    # a setting whose records stop short is untested: it neither passes nor ends in failure
    short = {path[0]: {i: same[i] for i in range(100)}}
    trials = asks_guard.walk(reference, short, n, path=path)
    assert [t.status for t in trials] == ["untested"] and asks_guard.chosen(trials) is None
    # the first setting failing leaves nothing: ASKS stays off; a failure shows before the split is done
    assert asks_guard.chosen(asks_guard.walk(reference, {path[0]: one_change}, n, path=path)) is None
    early = asks_guard.walk(reference, {path[0]: {i: one_change[i] for i in range(16)}}, n, path=path)
    assert [(t.status, t.n, t.changed) for t in early] == [("failed", 16, 1)]


@pytest.mark.slow
def test_a_walk_on_the_engine_records_every_answer_and_resumes(smollm2, tmp_path):
    from rksc.bench.datasets import load_problems
    from rksc.reasoning.solver import SolveConfig, Solver

    solver = Solver(smollm2, kv_budget=64 << 20)
    problems = load_problems("gsm8k", 1019, 2)
    config = SolveConfig(branches=2, max_new_tokens=6, layout="diverse")
    contexts = [""] * len(problems)
    never = (1.0, 0.5)  # tau 1: tested, never passed (a branch's own instruction has no donor), no answer changes
    first = asks_guard.run(solver, problems, contexts, config, tmp_path, 2, target=0.8, path=(never,), progress=False)
    assert first["max_changes"] == 0 and [t["status"] for t in first["trials"]] == ["passed"]
    assert first["trials"][0]["reused"] == 0 and first["trials"][0]["prompts"] == 2  # each second branch had a donor
    assert first["trials"][0]["changed"] == 0
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the reference and the setting, two problems each
    forced = (0.0, 0.0)  # every prompt with a donor reused, nothing recomputed but what has no donor
    second = asks_guard.run(solver, problems, contexts, config, tmp_path, 2, target=0.8, path=(never, forced),
                            progress=False)
    records = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 6 and [r["setting"] for r in records[4:]] == [[0.0, 0.0]] * 2  # only what was missing
    assert [t["tau"] for t in second["trials"]] == [1.0, 0.0] and second["trials"][0] == first["trials"][0]
    trial = second["trials"][1]
    assert trial["reused"] == 2 and trial["status"] in ("passed", "failed")
    assert trial["changed"] == sum(asks_guard.changed(r["answer"], ref["answer"])
                                   for r, ref in zip(records[4:], records[:2]))


def test_asks_auto_follows_the_answer_guard(smollm2):
    from rksc.reasoning.solver import SolveConfig, Solver

    solver = Solver(smollm2)
    guarded = {"tau": 0.9, "recompute": 0.3, "min_run": 8, "probe": 1, "guard": {"kind": "answer", "passed": True}}
    for calibration, on in ((None, False), (dict(guarded, guard=None), False),
                            (dict(guarded, guard={"kind": "answer", "passed": False}), False), (guarded, True)):
        assert profiles.asks_guarded(calibration) is on
        solver._asks_calibration = calibration
        asks = solver.asks_settings(SolveConfig())  # asks="auto", the default
        assert (asks is not None) is on
        if on:
            assert (asks.tau, asks.recompute) == (0.9, 0.3)
            assert solver.asks_settings(SolveConfig(cache="shared")) is None  # ASKS needs the block pool
        assert solver.asks_settings(SolveConfig(asks="off")) is None
        assert solver.asks_settings(SolveConfig(asks_tau=0.5)).tau == 0.5  # a tau by hand turns auto on
    solver._asks_calibration = False


def test_rksc_info_says_where_asks_is_on(capsys):
    from conftest import run

    code, out, _ = run(capsys, "info", "--json")
    asks = json.loads(out)["asks"]
    assert code == 0 and set(asks) >= {"qwen2.5-coder-0.5b", "smollm2-135m"}
    on, why = profiles.asks_default("qwen2.5-coder-0.5b")
    assert asks["qwen2.5-coder-0.5b"] == {"on": on, "why": why}


def test_a_rerun_into_a_folder_of_other_settings_is_refused(capsys, tmp_path):
    from conftest import run

    (tmp_path / "meta.json").write_text(json.dumps({"model": "qwen2.5-coder-0.5b", "branches": 4}))
    code, out, err = run(capsys, "asks-calibrate", "--out", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"--out {tmp_path} holds a calibration with other settings" in err
