"""Early exit on the engine with real models: exact equals the full run, impossible thresholds
change nothing, permissive ones fire and run fewer steps, and stopped branches free their KV."""

import math
from collections import Counter
from dataclasses import replace

import pytest

from rksc.errors import RkscError
from rksc.reasoning.early import Thresholds
from rksc.reasoning.solver import SolveConfig, Solver

pytestmark = pytest.mark.slow

QUESTION = "A box has 4 red balls and 5 blue balls. How many balls are in the box?"
NEVER = Thresholds(beta=1.1, prune_below=-math.inf, tau=math.inf, repeats=100_000, every=1_000_000,
                   skip_margin=1_000_000)


@pytest.fixture(scope="module")
def solver(smollm2):
    return Solver(smollm2)


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder-0.5B on this machine's default path: branches that finish at different lengths with
    agreeing answers."""
    return Solver.load("qwen2.5-coder-0.5b")


def steps(result) -> int:
    return max(b.tokens for b in result.branches)


def test_impossible_thresholds_reproduce_the_full_run_token_for_token(solver):
    config = SolveConfig(max_new_tokens=40, select="vote", thresholds=NEVER)
    full = solver.solve(QUESTION, config)
    gated = solver.solve(QUESTION, replace(config, early_stop=("beta", "confidence", "repeat", "probe", "skip")))
    assert [b.token_ids for b in gated.branches] == [b.token_ids for b in full.branches]
    assert gated.answer == full.answer and gated.chosen == full.chosen
    assert gated.early["fired"] == [] and not gated.early["verifier_skipped"]
    assert gated.early["probe"]["probes"] == 0
    solver.engine.check()


def test_permissive_thresholds_fire_run_fewer_steps_and_free_the_blocks(solver):
    config = SolveConfig(max_new_tokens=64, select="vote")
    full = solver.solve(QUESTION, config)
    prune_all = replace(config, early_stop=("confidence",), thresholds=Thresholds(prune_below=math.inf))
    pruned = solver.solve(QUESTION, prune_all)
    # every branch is pruned at its first check after a full window (32 tokens)
    assert {b.stop_reason for b in pruned.branches} <= {"pruned", "finished"}
    assert "pruned" in {b.stop_reason for b in pruned.branches}
    assert steps(pruned) <= 32 < steps(full)
    assert pruned.early["kv_freed_bytes"] > 0 and pruned.early["fired"][0]["policy"] == "confidence"
    pool = solver.engine.pool
    assert pool.num_used == 0  # nothing holds blocks after the solve
    solver.engine.check()
    beta = solver.solve(QUESTION, replace(config, early_stop=("beta",), thresholds=Thresholds(beta=0.5)))
    assert beta.early["fired"] and steps(beta) < steps(full)
    assert {b.stop_reason for b in beta.branches} & {"consensus"}
    assert beta.answer in {b.answer for b in beta.branches if b.stop_reason in ("finished", "length")}


def test_probes_read_answers_and_can_stop_branches(solver):
    config = SolveConfig(max_new_tokens=64, select="vote", early_stop=("probe",),
                         thresholds=Thresholds(every=16, stable=2, agree=100))
    r = solver.solve(QUESTION, config)
    assert r.early["probe"]["probes"] > 0 and r.early["probe"]["tokens"] > 0
    # most of a probe's prompt (the branch's full blocks) comes from the prefix index
    assert r.early["probe"]["cached_tokens"] > 0
    for b in r.branches:
        if b.stop_reason == "probe-stable":
            assert b.answer is not None and b.tokens < 64
    solver.engine.check()
    assert solver.engine.pool.num_used == 0


def test_verifier_skip_selects_by_vote_without_verifying(solver):
    config = SolveConfig(max_new_tokens=24, early_stop=("skip",), thresholds=Thresholds(skip_margin=0,
                                                                                          skip_confidence=0.0))
    r = solver.solve(QUESTION, config)
    assert r.early["verifier_skipped"] and all(b.verifier is None for b in r.branches)


def test_uncalibrated_lossy_policies_are_refused(solver):
    with pytest.raises(RkscError, match="calibrat"):
        solver.solve(QUESTION, SolveConfig(max_new_tokens=8, early_stop=("confidence",)))
    # thresholds set by hand for another policy do not make this one calibrated
    with pytest.raises(RkscError, match="--thresholds"):
        solver.solve(QUESTION, SolveConfig(max_new_tokens=8, early_stop=("confidence",), thresholds={"beta": 0.9}))
    with pytest.raises(RkscError, match="unknown threshold 'speed'"):
        SolveConfig(early_stop=("confidence",), thresholds={"speed": 2})
    # set by hand, it runs, and the result says which thresholds were not calibrated: a threshold no window
    # can reach prunes every branch at its first check (8 tokens); a field no policy of the solve reads
    # (exit_margin) is not listed
    r = solver.solve(QUESTION, SolveConfig(max_new_tokens=64, select="vote", early_stop=("confidence",),
                                           thresholds={"window": 8, "prune_below": 1e9, "exit_margin": 8}))
    assert r.early["by_hand"] == ["prune_below", "window"] and r.early["fired"][0]["policy"] == "confidence"
    assert all(b.stop_reason == "pruned" and b.tokens == 8 for b in r.branches)
    with pytest.raises(RkscError, match="depth 1"):
        SolveConfig(depth=2, early_stop=("exact",))
    with pytest.raises(RkscError, match="unknown early-stop policy"):
        SolveConfig(early_stop=("fast",))


def test_thresholds_set_by_hand_go_over_the_profiles(solver):
    """A dict of thresholds replaces only its fields: the profile's calibrated ones stay."""
    from rksc.reasoning import profiles

    saved = solver._profile
    solver._profile = profiles.Profile(solver.lm.name, ("exact", "skip"), Thresholds(skip_margin=5, skip_confidence=0.9),
                                       {"calibrated": ["exact", "skip"]})
    try:
        with pytest.raises(RkscError, match="exit_margin"):
            solver.early_settings(SolveConfig(early_stop=("cgee", "layers")))
        names, th = solver.early_settings(SolveConfig(early_stop=("cgee", "layers"),
                                                      thresholds={"exit_margin": 8, "exit_patience": 3}))
        assert names == ("exact", "skip", "layers")
        assert (th.skip_margin, th.skip_confidence, th.exit_margin, th.exit_patience) == (5, 0.9, 8.0, 3)
    finally:
        solver._profile = saved


@pytest.fixture(scope="module")
def full_run(qwen):
    """GSM8K test problem 1081 with Qwen 0.5B, solved in full (composite): seven branches agree, one
    does not, and they finish at different lengths. Selection comes after decoding, so the branches
    are those of a vote solve too."""
    from rksc.bench.datasets import load_problems

    question = load_problems("gsm8k", 1081, 1)[0].question
    qwen.engine.drop_cached()
    return question, qwen.solve(question, SolveConfig(max_new_tokens=512, select="composite"))


@pytest.mark.parametrize("select", ["vote", "composite"])
def test_exact_gives_the_full_runs_answer_on_a_real_model(qwen, full_run, select):
    """One problem at a time the steps before the stop are the full run's steps, so the branches
    that ended are token-identical and the selected answer cannot differ. Both solves start from a
    cold prefix index: in bf16 a warm one changes the prefill (only the prompt's tail is computed,
    a matmul of another shape that can round differently; on an AMX Xeon the branches then part
    from token 10 on, with or without early exit)."""
    question, full = full_run
    if select == "vote":  # the full run's vote: its branches' majority, a strict one
        (answer, top), (_, second) = Counter(b.answer for b in full.branches).most_common(2)
        assert top > second
    else:
        answer = full.answer
    qwen.engine.drop_cached()
    exact = qwen.solve(question, SolveConfig(max_new_tokens=512, select=select, early_stop=("exact",)))
    assert exact.early["fired"] and exact.early["fired"][0]["policy"] == "exact"
    assert steps(exact) < steps(full)
    assert exact.answer == answer
    for a, b in zip(full.branches, exact.branches):
        if b.stop_reason in ("finished", "length"):
            assert a.token_ids == b.token_ids
        else:
            assert b.stop_reason == "consensus" and a.token_ids[:b.tokens] == b.token_ids
    qwen.engine.check()


def test_replay_of_a_recorded_run_matches_the_online_stop(solver):
    """Calibration replays recorded full runs with the same policy code the solver runs online;
    one problem at a time, the online run stops the same branches at the same token counts."""
    from rksc.bench import replay

    config = SolveConfig(max_new_tokens=64, select="vote", thresholds=Thresholds(beta=0.6, repeats=3))
    solver.track_confidence = True
    try:
        full = solver.solve(QUESTION, config, gold="9")
    finally:
        solver.track_confidence = False
    trace = replay.trace_of(full, 0, "q")
    names = ("exact", "beta", "repeat")
    replayed = replay.replay(trace, names, config.thresholds)
    online = solver.solve(QUESTION, replace(config, early_stop=names))
    assert online.early["fired"] and replayed.steps < steps(full)  # something did stop
    assert replayed.answer == online.answer
    assert replayed.steps == steps(online) and replayed.tokens == sum(b.tokens for b in online.branches)


def test_probe_replay_of_a_recorded_run_matches_the_online_stop(solver):
    """Calibration records every branch's probe reads (probes stop nothing) and replays the probe
    policy on them; one problem at a time, the online probe policy stops at the same token counts
    with the same answer, and recording probes leaves the branches' tokens as they were."""
    from rksc.bench import replay

    config = SolveConfig(max_new_tokens=64, select="vote", thresholds=Thresholds(every=16))
    plain = solver.solve(QUESTION, config)
    solver.track_confidence = solver.record_probes = True
    try:
        full = solver.solve(QUESTION, config)
    finally:
        solver.track_confidence = solver.record_probes = False
    assert [b.token_ids for b in full.branches] == [b.token_ids for b in plain.branches]
    assert full.answer == plain.answer
    reads = [p for b in full.branches for p in b.probes]
    assert reads and all(start % 16 == 0 and start < read for start, read, _ in reads)
    trace = replay.trace_of(full, 0, "q")
    assert trace["probe_every"] == 16
    th = Thresholds(every=16, stable=2)
    replayed = replay.replay(trace, ("probe",), th)
    online = solver.solve(QUESTION, replace(config, early_stop=("probe",), thresholds=th))
    assert any(b.stop_reason == "probe-stable" for b in online.branches)  # something did stop
    assert replayed.answer == online.answer
    assert replayed.steps == steps(online) and replayed.tokens == sum(b.tokens for b in online.branches)
    solver.engine.check()
    assert solver.engine.pool.num_used == 0
