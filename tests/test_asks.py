"""ASKS, approximate KV reuse across prompts that are not token-identical: rotary correction,
exactness where it must be exact (identical prompts, tau above 1, the fallback below tau), and the
bookkeeping (fewer tokens computed, approximate blocks never served as exact prefix hits)."""

import math

import pytest
import torch
from transformers import DynamicCache

from conftest import TINY_FAMILIES, drain, engine_for, plain_generate, rand, tiny_model
from rksc.cache import POLICIES, BlockPool
from rksc.cache.donors import Donors
from rksc.engine.blend import Rotary
from rksc.engine.sequence import Asks, Sequence

EOS = frozenset({0})


def keys(model, ids, offset):
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), position_ids=torch.arange(offset, offset + len(ids))[None],
              cache=cache, use_cache=True)
    return [layer.keys[0].transpose(0, 1) for layer in cache.layers]  # per layer [T, H, D]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rotated_keys_equal_the_keys_of_the_same_run_at_another_offset(family):
    # attention with rotary embeddings depends on relative positions only: the same tokens placed
    # `shift` positions later have the same hidden states, and keys rotated by `shift`
    model = tiny_model(family, layers=3)
    ids, shift = rand(12, 3), 37
    at0, shifted = keys(model, ids, 0), keys(model, ids, shift)
    rotary = Rotary(model)
    angles = rotary.angles(torch.full((len(ids),), shift))
    for layer, (k0, ks) in enumerate(zip(at0, shifted)):
        cos, sin = angles[rotary.layer_types[layer]]
        assert not torch.allclose(k0, ks, atol=1e-3)  # the check below is not vacuous
        torch.testing.assert_close(Rotary.rotate(k0, cos, sin), ks, atol=2e-5, rtol=1e-4)
    back = rotary.angles(torch.full((len(ids),), -shift))  # negative shifts rotate back
    cos, sin = back[rotary.layer_types[0]]
    torch.testing.assert_close(Rotary.rotate(shifted[0], cos, sin), at0[0], atol=2e-5, rtol=1e-4)


def run(engine, seq):
    engine.add(seq)
    drain(engine)
    return seq


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_identical_prompt_read_from_a_donor_equals_full_recompute(family):
    model = tiny_model(family, layers=4)  # layers 0-1 run on every token; the row narrows after 1, 2 and 3
    engine = engine_for(model)
    ids = rand(40, 5)
    donor = run(engine, Sequence(ids, 12, stop_ids=EOS, hold=True, asks=Asks(tau=0.0)))
    engine.pool.invalidate(donor.table.blocks)  # no exact prefix hit: only ASKS can serve the prompt
    target = run(engine, Sequence(ids, 12, stop_ids=EOS, asks=Asks(tau=0.0, recompute=0.15)))
    report = target.out.asks_report
    assert report["reused"] and report["matched"] == len(ids) - 1 and report["cached_tokens"] == 0
    assert report["similarity"] == pytest.approx((len(ids) - 1) / len(ids), abs=1e-4)  # the last token is computed
    assert report["recomputed"] == 1 + 6  # the last token and ceil(15% of 39)
    assert target.token_ids == donor.token_ids == plain_generate(model, ids, 12, set(EOS))
    engine.release(donor)
    drain(engine)
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tau_above_one_never_reuses_and_the_fallback_below_tau_is_exact(family):
    model = tiny_model(family, layers=4)
    shared = rand(30, 7)
    donor_ids, target_ids = rand(6, 8) + shared, rand(9, 9) + shared
    expected = plain_generate(model, target_ids, 12, set(EOS))
    for tau, tried in ((1.5, False), (1.0, True)):
        engine = engine_for(model)
        run(engine, Sequence(donor_ids, 4, stop_ids=EOS, asks=Asks(tau=tau)))
        target = run(engine, Sequence(target_ids, 12, stop_ids=EOS, asks=Asks(tau=tau)))
        assert engine.stats.asks_steps == int(tried)
        if tried:  # the shifted run makes the similarity fall short of 1: full prefill after the test
            assert target.out.asks_report["matched"] >= 24 and not target.out.asks_report["reused"]
            assert target.out.asks_report["similarity"] < 1.0
        else:
            assert target.out.asks_report is None
        assert not target.out.approximate and target.token_ids == expected


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_recompute_set_is_the_tokens_whose_kv_deviates(family):
    """A donor's KV is spoiled on some tokens at every layer; an identical prompt reads it. The
    deviation ranking sends exactly the spoiled tokens through the model, and the result is full
    recompute's; recomputing fewer tokens than were spoiled leaves its mark on the logits."""
    model = tiny_model(family, layers=5)
    ids, spoiled = rand(40, 21), [3, 11, 12, 25, 30]
    expected = plain_generate(model, ids, 6, set(EOS))
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0, -1]
    out = {}
    for r in (0.0, len(spoiled) / (len(ids) - 1), 1.0):
        engine = engine_for(model)
        donor = run(engine, Sequence(ids, 0, hold=True, asks=Asks(tau=0.0)))
        engine.pool.invalidate(donor.table.blocks)
        bs = engine.pool.block_size
        slots = torch.tensor([donor.table.blocks[p // bs] * bs + p % bs for p in spoiled])
        for k, v in zip(engine.runner.kv.k, engine.runner.kv.v):
            k[slots] += 3.0 * torch.randn(k[slots].shape, generator=torch.Generator().manual_seed(1))
            v[slots] += 3.0 * torch.randn(v[slots].shape, generator=torch.Generator().manual_seed(2))
        target = run(engine, Sequence(ids, 6, stop_ids=EOS, keep_logits=True, asks=Asks(tau=0.0, recompute=r)))
        report = target.out.asks_report
        assert report["reused"] and report["cuts"] == [1, 2, 3]
        assert report["recomputed"] == 1 + math.ceil(r * (len(ids) - 1))
        out[r] = target
        engine.release(donor)
    for r in (len(spoiled) / (len(ids) - 1), 1.0):
        assert out[r].token_ids == expected
        torch.testing.assert_close(out[r].out.logits, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[0.0].out.logits, full, atol=1e-2)  # the spoiled KV matters


def test_shifted_reuse_computes_fewer_tokens_and_its_blocks_never_serve_exact_hits():
    model = tiny_model("qwen2", layers=4)
    engine = engine_for(model)
    shared = rand(48, 11)
    donor_ids, target_ids = rand(5, 12) + shared, rand(11, 13) + shared
    run(engine, Sequence(donor_ids, 4, stop_ids=EOS, asks=Asks(tau=0.0)))
    target = run(engine, Sequence(target_ids, 8, stop_ids=EOS, hold=True, asks=Asks(tau=0.0, recompute=0.25)))
    report = target.out.asks_report
    assert report["reused"] and target.out.approximate
    assert report["matched"] >= 40  # the shared run, shifted by 6 positions
    # every token without a donor (the last one included) and a quarter of the reused ones
    assert report["recomputed"] == report["tokens"] - report["matched"] + -(-report["matched"] * 25 // 100)
    assert report["recomputed"] < report["tokens"] * 0.6
    assert engine.stats.asks_reused == 1 and engine.stats.asks_computed == report["recomputed"]
    assert len(target.token_ids) == 8
    # the approximate blocks left the prefix index: the same prompt again is computed exactly
    again = run(engine, Sequence(target_ids, 8, stop_ids=EOS))
    assert again.out.cached_tokens == 0
    assert again.token_ids == plain_generate(model, target_ids, 8, set(EOS))
    # and an approximate prompt is no donor
    assert all(d != tuple(target_ids) for d in engine.scheduler.donors._donors)
    engine.release(target)
    drain(engine)
    engine.check()
    assert engine.pool.num_used == 0


def test_donor_positions_count_only_while_their_blocks_hold_the_same_kv():
    pool = BlockPool(8, 4, POLICIES["lru"])
    donors = Donors(pool)
    ids = list(range(10, 32))  # 5 full blocks and a partial one
    table, _, _ = pool.allocate_sequence(ids)
    donors.add(ids, table)
    target = [1, 2, 3] + ids
    plan = donors.plan(target, 0, min_run=8)
    assert plan is not None and plan.matched == len(ids) - 1 and set(plan.shifts[3:-1]) == {3}
    pool.free(table)  # full blocks stay cached: still donors
    assert donors.plan(target, 0, min_run=8).matched == 20  # the partial last block went to the free list
    while pool.evict() is not None:
        pass
    other, _, _ = pool.allocate_sequence(list(range(50, 80)))  # the blocks are retaken for other KV
    assert donors.plan(target, 0, min_run=8) is None
    assert donors.still_valid(plan).matched == 0
    pool.free(other)


@pytest.mark.slow
def test_diverse_solve_reuses_the_first_branchs_kv_and_tau_above_one_equals_asks_off(smollm2):
    from rksc.reasoning.solver import Solver, SolveConfig

    solver = Solver(smollm2, kv_budget=64 << 20)
    question = "Tom has 3 apples and buys 5 more. He gives 2 to Ann. How many apples does Tom have now?"
    base = SolveConfig(branches=3, max_new_tokens=8, layout="diverse")
    off = solver.solve(question, base)
    never = solver.solve(question, base, asks="on", asks_tau=1.5)
    assert [b.token_ids for b in never.branches] == [b.token_ids for b in off.branches]
    assert never.kv_bytes["asks"] == [None, None, None]  # tau above 1: not even tried
    solver.engine.drop_cached()
    on = solver.solve(question, base, asks="on", asks_tau=0.0)
    first, *others = on.kv_bytes["asks"]
    assert first is None  # the first branch is computed in full: it is the donor
    for report in others:  # the problem text after another instruction, shifted
        assert report["reused"] and report["matched"] >= 20 and report["recomputed"] < report["tokens"]
    assert solver.engine.pool.num_used == 0
    solver.engine.check()


@pytest.mark.slow
def test_asks_curve_measures_fidelity_and_tau_above_one_reuses_nothing(smollm2):
    from rksc.bench import asks_curve, variants
    from rksc.bench.datasets import load_problems
    from rksc.reasoning.solver import Solver

    problems = load_problems("gsm8k", 1019, 1)
    examples = load_problems("gsm8k", 900, 6)
    cases = variants.cases(problems, examples, ("identical", "structure", "fewshot"))
    records = asks_curve.measure(Solver(smollm2, kv_budget=64 << 20), cases, [0.15], tokens=4, progress=False)
    assert len(records) == 3
    by = {r["level"]: r for r in records}
    assert by["identical"]["greedy"] and by["identical"]["kl"] < 1e-3  # float32: reusing identical KV is exact
    assert by["structure"]["matched"] > 0 and by["structure"]["recomputed"] < by["structure"]["target_tokens"]
    assert by["fewshot"]["exact_cached"] < by["fewshot"]["matched"]  # the problem after other examples
    rows = asks_curve.sweep(records)
    top = next(r for r in rows if r["tau"] > 1)
    assert top["reused"] == 0 and top["greedy_agreement"] == 1.0
    assert top["prefill_s"] == pytest.approx(sum(r["test_s"] + r["exact_s"] for r in records))
    bottom = next(r for r in rows if r["tau"] == 0.0)
    assert bottom["reused"] == 3
    # the default must reuse something, save time against exact prefix caching and keep fidelity
    chosen = asks_curve.choose([dict(r, saved_vs_exact=0.1) for r in rows], target=0.0)
    assert chosen is not None and chosen["reused"] > 0
    assert asks_curve.choose([dict(r, saved_vs_exact=-0.1) for r in rows], target=0.0) is None
    assert asks_curve.choose([dict(r, greedy_agreement=0.5, saved_vs_exact=0.1) for r in rows], target=0.99) is None


def test_variants_keep_the_problem_text_and_differ_around_it():
    from rksc.bench import variants
    from rksc.bench.datasets import Problem

    p = Problem("x-1", "How many legs do 3 cats have?", "12", "number", "gsm8k")
    shots = [Problem(f"x-{i}", f"Question {i}?", str(i), "number", "gsm8k", f"Work {i}. The answer is {i}.")
             for i in range(2, 7)]
    cases = {c.level: c for c in variants.cases([p], shots)}
    assert list(cases) == list(variants.LEVELS)
    assert cases["identical"].donor == cases["identical"].target
    for level, c in cases.items():
        assert p.question in c.target[-1]["content"] and p.question in c.donor[-1]["content"]
        assert level == "identical" or c.donor != c.target
    few = cases["fewshot"]
    assert "Question 2?" in few.donor[-1]["content"] and "Question 2?" not in few.target[-1]["content"]
