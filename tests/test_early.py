"""Early exit (CGEE): the torch-free policies, the replay that calibrates them, and the bound."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rksc.bench import replay
from rksc.reasoning import early
from rksc.reasoning.early import BranchView, Monitor, Thresholds


def view(answer=None, reason=None, weight=None, tokens=(), confs=()):
    v = BranchView(list(tokens), list(confs))
    if reason is not None:
        v.done, v.reason, v.answer, v.weight = True, reason, answer, weight
    return v


def test_exact_vote_needs_a_lead_larger_than_the_live_branches():
    views = [view("5", "finished")] * 3 + [view("6", "finished")] + [view(), view()]
    assert not early.settled(views, "vote")  # 3 vs 1 + 2 live: a tie is still possible
    views = [view("5", "finished")] * 4 + [view("6", "finished")] + [view(), view()]
    assert early.settled(views, "vote")  # 4 > 1 + 2
    assert early.Exact("vote").decide(views) == [(5, "consensus"), (6, "consensus")]


def test_exact_composite_counts_unknown_weights_as_0_for_the_leader_and_1_for_rivals():
    done = [view("5", "finished", 0.9), view("5", "finished", 0.9), view("5", "finished", None)]
    assert early.settled(done + [view("6", "finished", 0.3), view()], "composite")  # 1.8 > 0.3 + 1 live
    assert not early.settled(done + [view("6", "finished", 0.9), view()], "composite")  # 1.8 < 0.9 + 1
    assert early.settled(done + [view("6", "finished", 0.3)], "composite")  # no live branch: decided
    assert early.settled([view("5", "finished", 0.99)] * 3 + [view("6", "finished", 0.2), view()], "composite")
    assert not early.settled([view("5", "finished", None)] * 5 + [view()], "composite")


def test_exact_ignores_branches_that_are_not_candidates():
    views = [view(None, "pruned"), view(None, "consensus"), view("1", "finished"), view()]
    assert not early.settled(views, "vote")  # 1 vs 0 + 1 live


def test_majority_probability_is_the_beta_tail():
    assert early.majority_probability(4, 0) == pytest.approx(1 - 0.5 ** 5)
    assert early.majority_probability(3, 3) == 0.5
    assert early.majority_probability(0, 0) == 0.5
    assert early.majority_probability(1000, 24) == 1.0 and early.majority_probability(0, 1023) == 2.0 ** -1024


def test_majority_probability_matches_scipy():
    betainc = pytest.importorskip("scipy.special").betainc  # the bench extra: scipy's was the rule
    for leader in range(65):
        for runner_up in range(leader + 1):
            want = float(1.0 - betainc(leader + 1, runner_up + 1, 0.5))
            assert early.majority_probability(leader, runner_up) == pytest.approx(want, abs=2e-15)
    assert early.Beta(0.95).decide([view("1", "finished")] * 4 + [view()]) == [(4, "consensus")]
    assert early.Beta(0.99).decide([view("1", "finished")] * 4 + [view()]) == []


def test_confidence_prunes_a_low_window_and_stops_on_a_weighted_majority():
    low = view(tokens=range(32), confs=[1.0] * 32)
    high = view(tokens=range(32), confs=[9.0] * 32)
    assert early.Confidence(32, 2.0, math.inf).decide([low, high]) == [(0, "pruned")]
    done = [view("7", "finished", confs=[9.0] * 10)] * 3
    got = early.Confidence(32, -math.inf, 0.7).decide(done + [view(tokens=[1], confs=[1.0])])
    assert got == [(3, "consensus")]  # share 27 / 28
    assert early.Confidence(32, -math.inf, 0.99).decide(done + [view(tokens=[1], confs=[1.0])]) == []


def test_looping_finds_a_repeated_span_only():
    assert early.looping([1, 2, 3] * 12, repeats=8)
    assert not early.looping(list(range(40)), repeats=3)
    assert not early.looping([5] * 6, repeats=4)  # too short to count (min 32 tokens)
    assert early.looping([9, 9] + [4] * 40, repeats=8)


def test_probe_stops_a_branch_whose_probes_agree():
    v = view(tokens=range(10))
    v.probes = ["3", "3", "3"]
    other = view(tokens=range(10))
    other.probes = ["2", "3", None]
    assert early.Probe(3, 100).decide([v, other]) == [(0, "probe-stable")]
    m = Monitor(2, [early.Probe(3, 100)])
    m.views = [v, other]
    assert m.decide() == []  # no event yet
    m.probed(1, None)
    assert m.decide() == [(0, "probe-stable")] and m.views[0].answer == "3" and m.views[0].candidate


def test_monitor_records_what_fired_and_ends_stopped_branches_without_answers():
    m = Monitor(4, [early.Exact("vote")])
    for i in range(3):
        m.views[i].tokens += [1, 2]
        m.end(i, "finished", "5")
    m.views[3].tokens += [1, 2, 3]
    assert m.decide() == [(3, "consensus")]
    assert not m.live and not m.views[3].candidate and m.views[3].answer is None
    assert m.fired[0].policy == "exact" and m.fired[0].branches == [3] and m.fired[0].tokens == 3


def test_thresholds_round_trip_through_json_with_infinities():
    t = Thresholds(prune_below=-math.inf, tau=0.8, exit_margin=math.inf)
    d = t.to_dict()
    assert d["prune_below"] is None and d["exit_margin"] is None and d["tau"] == 0.8
    assert Thresholds.from_dict(d) == t


def test_clopper_pearson_upper_bound():
    assert replay.clopper_pearson_upper(0, 299) == pytest.approx(1 - 0.05 ** (1 / 299))
    assert replay.clopper_pearson_upper(0, 299) <= 0.01 < replay.clopper_pearson_upper(0, 298)
    assert replay.clopper_pearson_upper(1, 300) == pytest.approx(0.0157, abs=1e-3)
    assert replay.clopper_pearson_upper(5, 5) == 1.0


def trace(answers, lengths, select="vote", verifier=None, reasons=None, gold=None):
    """A recorded full run: branch i writes lengths[i] tokens and ends with answers[i]."""
    reasons = reasons or ["finished"] * len(answers)
    branches = [{"tokens": [7] * n, "confs": [5.0] * n, "probs": [0.9] * n, "answer": a, "reason": r,
                 "verifier": None if verifier is None else verifier[i], "confidence": 0.9}
                for i, (a, n, r) in enumerate(zip(answers, lengths, reasons))]
    from rksc.reasoning.select import Candidate, select as pick
    chosen = pick([Candidate(b["answer"], 0.9, b["verifier"]) for b in branches], select)
    return {"index": 0, "problem": "p", "gold": gold, "answer": answers[chosen], "select": select,
            "branches": branches}


def test_replay_without_policies_is_the_full_run():
    t = trace(["5", "5", "6", "5"], [10, 20, 30, 40])
    r = replay.replay(t, (), Thresholds())
    assert (r.answer, r.steps, r.tokens) == ("5", 40, 100)


def test_replay_exact_stops_when_the_answer_is_decided():
    t = trace(["5", "5", "5", "6", "7"], [10, 11, 12, 50, 60])
    r = replay.replay(t, ("exact",), Thresholds())
    assert r.answer == "5" and r.steps == 12 and r.tokens == 10 + 11 + 12 + 12 + 12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1", "2", "3", None]), st.integers(1, 30),
                          st.sampled_from(["finished", "length"]), st.floats(0, 1)), min_size=1, max_size=8),
       st.sampled_from(["vote", "composite"]))
def test_exact_never_changes_the_selected_answer(branches, method):
    answers, lengths, reasons, scores = map(list, zip(*branches))
    t = trace(answers, lengths, method, scores if method == "composite" else None, reasons)
    r = replay.replay(t, ("exact",), Thresholds())
    assert r.answer == t["answer"]
    assert r.steps <= max(lengths)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1", "2", None]), st.integers(1, 80)), min_size=1, max_size=8))
def test_impossible_thresholds_reproduce_the_full_run(branches):
    answers, lengths = map(list, zip(*branches))
    t = trace(answers, lengths)
    t["probe_every"] = 64
    for b in t["branches"]:  # probes that read the branch's own answer early on
        b["probes"] = [[k, k + 5, b["answer"]] for k in range(64, len(b["tokens"]) - 5, 64)]
    never = Thresholds(beta=1.1, repeats=10_000)
    r = replay.replay(t, ("beta", "confidence", "repeat", "probe", "skip"), never)
    assert (r.answer, r.steps, r.tokens) == (t["answer"], max(lengths), sum(lengths))


def test_fit_walks_the_whole_fixed_sequence_while_no_answer_changes():
    # four short branches agree on 5; the others ramble on with minority answers: no stop can
    # change the vote, so every step is accepted and the combination is the last one
    easy = trace(["5", "5", "5", "5", "6", "6", "7", "8"], [10, 10, 10, 10, 40, 40, 40, 200], gold="5")
    report = replay.fit([easy] * 60, target=0.05)  # 0 of 60 disagreeing: bound 4.9%
    assert report["start"]["policies"] == ["exact"]
    steps = replay.path([easy])
    assert [s["knob"] for s in report["path"]] == [k for k, _, _ in steps] and report["steps"] == len(steps)
    assert all(s["accepted"] and s["disagree"] == 0 for s in report["path"])
    combo = report["combination"]
    assert combo == {k: v for k, v in report["path"][-1].items() if k not in ("knob", "set", "accepted")}
    assert combo["bound"] <= 0.05 and combo["steps_saved"] > report["start"]["steps_saved"]
    assert replay.fit([easy] * 20, target=0.05)["combination"]["policies"] == ["exact"]  # bound 13.9%


def test_fit_ends_at_the_first_failing_step():
    # a problem whose majority comes late: three short branches agree on 5, five long ones say 6.
    # Early steps stop it too soon (the long branches repeat one token, and Beta at 0.9 is sure of
    # 5 after three votes), so the walk must end there and test nothing after
    risky = trace(["5", "5", "5", "6", "6", "6", "6", "6"], [10, 10, 10, 300, 300, 300, 300, 300])
    assert risky["answer"] == "6"
    easy = trace(["5"] * 8, [10] * 8, gold="5")
    report = replay.fit([risky] * 2 + [easy] * 98, target=0.05)  # 2 of 100 differ: bound 6.2%
    knobs = [s["knob"] for s in report["path"]]
    assert report["path"][-1]["accepted"] is False
    failing = report["path"][-1]
    assert failing["disagree"] >= 1 and failing["bound"] > 0.05
    assert len(knobs) < len(replay.path([risky, easy]))  # the walk ended early
    assert report["combination"]["disagree"] == 0
    before = [s for s in report["path"] if s["accepted"]]  # the choice is the last step before the failure
    expected = before[-1] if before else report["start"]
    assert report["combination"] == {k: v for k, v in expected.items() if k not in ("knob", "set", "accepted")}


def test_an_order_learnt_on_one_split_is_confirmed_on_another():
    risky = trace(["5", "5", "5", "6", "6", "6", "6", "6"], [10, 10, 10, 300, 300, 300, 300, 300])
    easy = trace(["5"] * 8, [10] * 8, gold="5")
    rambling = trace(["5", "5", "5", "5", "5", "5", "6", "7"], [10, 10, 10, 10, 10, 10, 200, 200])
    learn = [risky] * 3 + [rambling] * 47 + [easy] * 50
    steps = replay.ordered_path(learn, target=0.01)
    assert steps, "some notch changes none of the answers"
    # every prefix of the learnt order keeps the learning split's disagreement within the target
    names, th = ("exact",), Thresholds()
    from dataclasses import replace
    for knob, policy, fields in steps:
        names = names if policy in names else (*names, policy)
        th = replace(th, **fields)
        assert replay.evaluate(learn, names, th).disagree <= 1
    # confirmed on other problems: the walk follows the learnt order, not the fixed one
    confirm = replay.fit([rambling] * 150 + [easy] * 150, target=0.01, steps=steps)
    assert [s["knob"] for s in confirm["path"]] == [k for k, _, _ in steps[:len(confirm["path"])]]
    assert confirm["combination"]["bound"] <= 0.01 and confirm["combination"]["disagree"] == 0


def test_layer_exit_replay_reads_the_score_where_the_question_exits():
    b = {"margins": [-9.0, -9.0, 1.0, 3.0, 5.0, 6.0], "verifier": 0.7}
    layer, score = replay.lens_verdict(b, Thresholds(exit_margin=4, exit_patience=2, exit_min_layer=2))
    assert layer == 5 and score == pytest.approx(1 / (1 + math.exp(-6.0)))
    assert replay.lens_verdict(b, Thresholds(exit_margin=4, exit_patience=1, exit_min_layer=0))[0] == 0
    assert replay.lens_verdict(b, Thresholds()) == (None, 0.7)  # never exits: the full model's score
    t = trace(["5", "6"], [3, 3], "composite", [0.9, 0.2])
    t["branches"][0]["margins"] = [0.0, 5.0, 5.0, 5.0]
    t["branches"][1]["margins"] = [0.0, -5.0, -5.0, -5.0]
    th = Thresholds(exit_margin=4, exit_patience=1, exit_min_layer=1)
    assert replay.layers_saved(t, th) == (2, 4)  # both exit after layer 1: layers 2 and 3 skipped
    assert replay.replay(t, ("layers",), th).answer == "5"


def probed(answers, lengths, reads, every=64):
    """A full run recorded with probes: reads[i] lists (started, read at, answer) of branch i."""
    t = trace(answers, lengths)
    t["probe_every"] = every
    for b, r in zip(t["branches"], reads):
        b["probes"] = [list(x) for x in r]
    return t


def test_probe_replay_stops_the_problem_when_the_probes_agree():
    # four branches; by token 73 every one's probe (or its own answer) says 5; one would ramble to 300
    t = probed(["5", "5", "5", "5"], [40, 200, 250, 300],
               [[], [(64, 70, "5")], [(64, 71, "4"), (128, 135, "5")], [(64, 73, "5"), (128, 136, "5")]])
    r = replay.replay(t, ("probe",), Thresholds(agree=4))
    assert r.answer == "5" and r.steps == 135  # branch 2's probe read at 135 completes the agreement
    assert r.tokens == 40 + 3 * 135
    assert r.probes == 2 * 3  # probes started at 64 and 128 by the three live branches
    # agreement of 3 is reached at token 73 (branch 0's answer, probes of 1 and 3)
    assert replay.replay(t, ("probe",), Thresholds(agree=3)).steps == 73


def test_probe_replay_stops_a_branch_whose_probes_are_stable():
    t = probed(["5", "6"], [300, 300], [[(64, 70, "5"), (128, 134, "5"), (192, 199, "5")], [(64, 70, "6")]])
    r = replay.replay(t, ("probe",), Thresholds(stable=3))
    assert r.steps == 300 and r.tokens == 199 + 300  # branch 0 stops with its third equal probe
    # probing every 128 tokens reads only the probes started at multiples of 128: never 3 in a row
    assert replay.replay(t, ("probe",), Thresholds(stable=3, every=128)).tokens == 600
    assert replay.replay(t, ("probe",), Thresholds(stable=1, every=128)).tokens == 134 + 300


def test_probe_replay_needs_runs_recorded_with_probes():
    with pytest.raises(ValueError, match="recorded without probes"):
        replay.replay(trace(["5"], [10]), ("probe",), Thresholds(agree=1))
    with pytest.raises(ValueError, match="recorded every 64"):
        replay.replay(probed(["5"], [10], [[]]), ("probe",), Thresholds(agree=1, every=96))
    assert not replay.knobs([trace(["5"], [10])])["agree"][1]  # no probe knob without probes
    agree = replay.knobs([probed(["5"] * 8, [10] * 8, [[]] * 8)])["agree"][1]
    assert [k["agree"] for k in agree] == [8, 7, 6, 5]  # every branch first, one fewer each notch
