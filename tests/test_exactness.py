"""The one property every later optimisation must keep: sharing the prefix changes no token.

Greedy float32 decoding of B branches from one shared prefix KV must give, for every branch,
exactly the tokens of plain `model.generate` on that branch's full prompt with no sharing.
"""

import contextlib

import pytest
import torch

from conftest import TINY_FAMILIES, faulty, plain_generate, tiny_model
from rksc.engine.decode import collect, decode
from rksc.engine.dense import DenseRunner
from rksc.engine.sampler import Sampler, Sampling
from rksc.errors import ProgramError, RkscError
from rksc.reasoning.solver import SolveConfig, Solver


def shared_decode(model, prefix: list[int], suffixes: list[list[int]], max_new_tokens: int,
                  eos: set[int], sampling: Sampling = Sampling()):
    runner = DenseRunner(model)
    shared = runner.prefill(prefix)
    batch, logits = runner.extend(shared, suffixes)
    sampler = Sampler(sampling, len(suffixes))
    return collect(decode(runner, batch, logits, sampler, max_new_tokens, eos), len(suffixes))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_shared_prefix_matches_generate(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 96, (40,), generator=g).tolist()
    # suffixes of different lengths exercise the padding between prefix and suffix
    suffixes = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (1, 5, 3, 9, 2)]
    eos = {0}
    traces = shared_decode(model, prefix, suffixes, 24, eos)
    for suffix, trace in zip(suffixes, traces):
        assert trace.token_ids == plain_generate(model, prefix + suffix, 24, eos)


def test_tiny_model_rows_that_end_early_stop_and_others_continue():
    model = tiny_model("llama")
    prefix = list(range(10, 30))
    suffixes = [[5, 6], [7], [8, 9, 10]]
    free = shared_decode(model, prefix, suffixes, 12, eos=set())
    stop_token = free[1].token_ids[3]  # make branch 1 end at its 4th token
    traces = shared_decode(model, prefix, suffixes, 12, eos={stop_token})
    assert traces[1].token_ids == free[1].token_ids[:4] and traces[1].finished
    for i in (0, 2):
        ref = plain_generate(model, prefix + suffixes[i], 12, {stop_token})
        assert traces[i].token_ids == ref
        assert traces[i].finished == (stop_token in ref)


def test_sampled_branch_does_not_depend_on_batch_size():
    model = tiny_model("qwen2")
    prefix, suffixes = list(range(20, 50)), [[3, 4], [5], [6, 7, 8]]
    sampling = Sampling(temperature=0.9, seed=7)
    together = shared_decode(model, prefix, suffixes, 16, set(), sampling)
    runner = DenseRunner(model)
    shared = runner.prefill(prefix)
    for i, suffix in enumerate(suffixes):
        batch, logits = runner.extend(shared, [suffix])
        (alone,) = collect(decode(runner, batch, logits, Sampler(sampling, 1, first_branch=i), 16, set()), 1)
        assert alone.token_ids == together[i].token_ids
    assert len({tuple(t.token_ids) for t in together}) > 1


@pytest.mark.slow
def test_smollm2_float32_solver_branches_match_generate(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                "in May. How many clips did Natalia sell altogether in April and May?")
    result = solver.solve(question, SolveConfig(branches=8, max_new_tokens=40, verify=False, cache="pool"))
    assert len(result.branches) == 8
    assert len({b.hint for b in result.branches}) == 8
    for b in result.branches:
        assert b.prompt_ids[:result.prefix_tokens] == result.branches[0].prompt_ids[:result.prefix_tokens]
        assert b.token_ids == plain_generate(smollm2.model, b.prompt_ids, 40, solver.eos), b.index


@pytest.mark.slow
def test_smollm2_every_cache_computes_the_same_tokens_and_scores(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=3, max_new_tokens=16, verifier="prompt")  # the same verifier everywhere
    results = {cache: solver.solve("What is 17 plus 25?", config, cache=cache) for cache in ("pool", "shared", "none")}
    pool = results["pool"]
    for other in ("shared", "none"):
        assert [b.token_ids for b in pool.branches] == [b.token_ids for b in results[other].branches]
        assert [b.verifier for b in pool.branches] == pytest.approx([b.verifier for b in results[other].branches],
                                                                    abs=1e-4)
        assert pool.answer == results[other].answer


@pytest.mark.slow
def test_smollm2_tree_leaves_match_generate_on_their_whole_path(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=2, max_new_tokens=8, depth=3, keep=1, verify=False)
    result = solver.solve("What is 12 times 7 plus 5?", config)
    deepest = [b for b in result.branches if b.depth == 3]
    assert len(deepest) == 2 and result.tree[0]["kept"] and result.tree[1]["kept"]
    for b in deepest:
        generated = 8  # the last depth's own tokens end the path
        path, own = b.prompt_ids + b.token_ids[:-generated], b.token_ids[-generated:]
        assert own == plain_generate(smollm2.model, path, generated, solver.eos)
    assert solver.engine.pool.num_used == 0  # every block released; full ones stay cached


@pytest.mark.slow
def test_smollm2_continuation_verifier_equals_a_plain_forward_over_the_whole_conversation(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    result = solver.solve("What is 17 plus 25?", SolveConfig(branches=3, max_new_tokens=12, verifier="continue"))
    for b in result.branches:
        cue = solver.prompts.continuation(b.finished)
        full = b.prompt_ids + b.token_ids + cue
        assert "Is this solution correct?" in solver.prompts.tok.decode(cue)
        with torch.inference_mode():
            logits = smollm2.model(torch.tensor([full])).logits[:, -1].float()
        assert b.verifier == pytest.approx(solver.verifier.score_logits(logits)[0], abs=1e-4)


QUESTIONS = ["What is 17 plus 25?", "A shelf holds 4 rows of 6 books. How many books are on the shelf?",
             "Tom has 3 apples and buys 4 more. How many apples does he have?"]


@pytest.mark.slow
def test_smollm2_problems_in_flight_match_generate_and_one_at_a_time(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=4, max_new_tokens=24)
    together = [r for _, r in solver.solve_many(QUESTIONS, config, concurrency=3)]
    assert max(solver.engine.stats.rows_hist) > 4  # rows of several problems shared decode steps
    for question, result in zip(QUESTIONS, together):
        alone = solver.solve(question, config)
        assert [b.token_ids for b in result.branches] == [b.token_ids for b in alone.branches]
        assert [b.verifier for b in result.branches] == pytest.approx([b.verifier for b in alone.branches], abs=1e-4)
        assert result.answer == alone.answer and result.chosen == alone.chosen
        for b in result.branches:
            assert b.token_ids == plain_generate(smollm2.model, b.prompt_ids, 24, solver.eos), (question, b.index)
    assert solver.engine.pool.num_used == 0


@pytest.mark.slow
def test_smollm2_trees_in_flight_match_generate_on_their_whole_path(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=2, max_new_tokens=8, depth=2, keep=2, verify=True)
    results = [r for _, r in solver.solve_many(QUESTIONS[:2], config, concurrency=2)]
    for question, result in zip(QUESTIONS[:2], results):
        alone = solver.solve(question, config)
        assert [b.token_ids for b in result.branches] == [b.token_ids for b in alone.branches]
        for b in result.branches:
            if b.depth == 2:
                path, own = b.prompt_ids + b.token_ids[:-8], b.token_ids[-8:]
                assert own == plain_generate(smollm2.model, path, 8, solver.eos)
    assert solver.engine.pool.num_used == 0


@pytest.mark.slow
def test_smollm2_a_failing_problem_reports_its_error_and_the_rest_go_on(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    results = list(solver.solve_many([QUESTIONS[0], "   ", QUESTIONS[1]], SolveConfig(branches=2, max_new_tokens=6),
                                     concurrency=2))
    assert [i for i, _ in results] == [0, 1, 2]
    assert isinstance(results[1][1], RkscError) and "empty" in str(results[1][1])
    assert results[0][1].answer is not None or results[0][1].branches
    assert len(results[2][1].branches) == 2


@pytest.mark.slow
def test_smollm2_a_program_that_raises_fails_alone_and_frees_its_blocks(smollm2, monkeypatch):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=4, max_new_tokens=16)
    clean = [r for _, r in solver.solve_many(QUESTIONS, config, concurrency=3)]
    real = Solver.program
    monkeypatch.setattr(Solver, "program", lambda self, p, c: faulty(real(self, p, c), 2, ValueError("injected"))
                        if p == QUESTIONS[1] else real(self, p, c))
    seen = []
    for i, result in solver.solve_many(QUESTIONS, config, concurrency=3):
        seen.append(i)
        solver.engine.check()
        if i == 1:
            assert isinstance(result, ProgramError) and "ValueError: injected" in str(result)
            assert isinstance(result.__cause__, ValueError)
        else:
            assert [b.token_ids for b in result.branches] == [b.token_ids for b in clean[i].branches]
    assert seen == [0, 1, 2] and solver.engine.pool.num_used == 0 and not solver.engine.has_work


def test_a_temperature_or_top_p_too_small_for_float32_samples_the_top_token():
    from rksc.engine.sampler import generator_for, sample_rows

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, -2.0, 4.0, 4.0]])
    for t in (1e-30, 1e-300, 5e-324):  # logits / t overflows float32 (the last is 0 in float32)
        samplings = [Sampling(t, 1.0, seed) for seed in (0, 1)]
        tokens, probs, _, _ = sample_rows(logits, samplings, [generator_for(s, 0) for s in samplings])
        assert tokens[0] == 1 and tokens[1] in (2, 3) and all(0 < p <= 1 for p in probs)
        got, _ = Sampler(samplings[0], 2)(logits)
        assert got[0] == 1 and got[1] in (2, 3)
    for top_p in (1e-30, 5e-324):  # a top_p that float32 holds as 0 still keeps the top token
        samplings = [Sampling(1.0, top_p, seed) for seed in (0, 1)]
        tokens, _, _, _ = sample_rows(logits, samplings, [generator_for(s, 0) for s in samplings])
        assert tokens[0] == 1 and tokens[1] in (2, 3)
        assert Sampler(samplings[0], 2)(logits)[0][0] == 1


def test_a_step_whose_sampling_fails_ends_its_sequences_with_the_error_and_the_engine_goes_on(monkeypatch):
    from rksc.engine import engine as engine_module
    from rksc.engine.engine import Engine
    from rksc.engine.sequence import Sequence

    model = tiny_model("llama")
    engine = Engine(model, kv_budget=1 << 20, block_size=4)
    real, calls = engine_module.sample_rows, []

    def failing_once(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("probability tensor contains nan")
        return real(*args, **kw)

    monkeypatch.setattr(engine_module, "sample_rows", failing_once)
    first = [engine.add(Sequence([1, 2, 3], 8)) for _ in range(2)]
    while engine.has_work and len(calls) < 3:
        with contextlib.suppress(RuntimeError):
            engine.step()
    assert all(s.stop_reason == "error" and "nan" in s.out.error for s in first)
    engine.check()
    late = engine.add(Sequence([1, 2, 3], 8))  # the engine still decodes, and as before
    while engine.has_work:
        engine.step()
    assert late.stop_reason == "length" and late.token_ids == plain_generate(model, [1, 2, 3], 8, ())
    assert engine.pool.num_used == 0
    engine.check()


@pytest.mark.slow
def test_smollm2_a_step_that_fails_fails_the_problem_it_held_and_solve_many_goes_on(smollm2, monkeypatch):
    solver = Solver(smollm2, kv_budget=64 << 20)
    config = SolveConfig(branches=2, max_new_tokens=8)
    clean = [r for _, r in solver.solve_many(QUESTIONS, config, concurrency=1)]
    real, calls = solver.engine.runner.run, []

    def failing(step, watch):  # the fifth forward pass runs out of memory; one problem is in flight
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected: out of memory")
        return real(step, watch)

    monkeypatch.setattr(solver.engine.runner, "run", failing)
    results = list(solver.solve_many(QUESTIONS, config, concurrency=1))
    assert [i for i, _ in results] == [0, 1, 2] and solver.engine.stats.failed_steps == 1
    failed = [i for i, r in results if isinstance(r, RkscError)]
    assert len(failed) == 1 and "injected: out of memory" in str(results[failed[0]][1])
    for i, result in results:
        if i not in failed:
            assert [b.token_ids for b in result.branches] == [b.token_ids for b in clean[i].branches]
    assert solver.engine.pool.num_used == 0 and not solver.engine.has_work
    solver.engine.check()
