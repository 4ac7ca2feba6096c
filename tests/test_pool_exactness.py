"""The engine on the paged block pool changes no token: forks, trees, prefix-index hits, evictions,
chunked prompts, rows of many requests in one step, preemption and cancels included; on both decode
attention paths."""

import math

import pytest
import torch

from conftest import TINY_FAMILIES, drain, engine_for, plain_generate, rand, tiny_model
from rksc.cache import POLICIES
from rksc.engine.sampler import Sampling
from rksc.engine.sequence import Sequence

EOS = frozenset({0})


@pytest.fixture(autouse=True, params=["kernel", "cascade"])
def decode_attention(request, monkeypatch):
    """Every test runs on both decode attention paths: rksc's compiled kernel (float32 pools) and the
    cascade of torch ops (bf16 pools, machines without a compiler)."""
    from rksc.engine import paged

    if request.param == "cascade":
        monkeypatch.setattr(paged.kernel, "supports", lambda pool: False)
    elif not paged.kernel.available():
        pytest.skip(f"rksc's attention kernel: {paged.kernel.status().error}")
    return request.param


def held_prefix(engine, ids):
    prefix = engine.add(Sequence(ids, hold=True))
    drain(engine)
    return prefix


def branches(engine, prefix, suffixes, n, eos=EOS, hold=False, depth=1):
    return [engine.add(Sequence(prefix.ids + s, n, stop_ids=eos, parent=prefix, hold=hold, depth=depth))
            for s in suffixes]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pool_branches_match_generate(family):
    model = tiny_model(family)
    engine = engine_for(model)
    prefix_ids = rand(42, 1)
    suffixes = [rand(n, 10 + n) for n in (1, 5, 3, 9, 2)]
    prefix = held_prefix(engine, prefix_ids)
    seqs = branches(engine, prefix, suffixes, 24)
    engine.release(prefix)
    drain(engine)
    for s in seqs:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 24, set(EOS))
        assert s.out.cached_tokens == 42  # the fork reused the whole prefix, its partial last block included
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rows_of_several_problems_and_chunked_prompts_in_one_step_match_generate(family):
    model = tiny_model(family)
    engine = engine_for(model, prefill_chunk=7)  # prompts arrive in chunks of 7 tokens
    problems = [(rand(30 + 9 * p, 100 + p), [rand(n, 200 + 10 * p + n) for n in (1, 4, 2)]) for p in range(3)]
    prefixes = [engine.add(Sequence(ids, hold=True)) for ids, _ in problems]
    seqs = []
    while engine.has_work or not seqs:
        engine.step()
        engine.check()
        for p, (prefix, (_, suffixes)) in enumerate(zip(prefixes, problems)):
            if prefix.finished and not prefix.book.released:  # each problem forks as soon as its prefix is done
                seqs += branches(engine, prefix, suffixes, 20)
                engine.release(prefix)
    assert max(engine.stats.rows_hist) == 9  # every problem's branches decoded together
    for s in seqs:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 20, set(EOS))


def test_prefix_is_held_once_and_memory_grows_by_suffixes_only():
    model = tiny_model("llama")
    engine = engine_for(model)
    prefix = held_prefix(engine, rand(64, 2))  # 16 full blocks
    for n in (1, 4, 8):
        seqs = branches(engine, prefix, [rand(3, 20 + i) for i in range(n)], 5, eos=frozenset(), hold=True)
        drain(engine)
        tables = [s.table for s in seqs]
        own_blocks = sum(len(t.blocks) - 16 for t in tables)
        assert engine.runner.kv_bytes(tables) == (16 + own_blocks) * engine.runner.block_bytes
        assert own_blocks == n * 2  # 3 suffix + 5 new tokens - 1 not yet written = 7 -> 2 blocks
        for s in seqs:
            engine.release(s)
    engine.release(prefix)
    engine.check()
    assert engine.pool.num_used == 0


def test_tree_forks_at_several_depths_match_generate():
    model = tiny_model("qwen2")
    engine = engine_for(model)
    root_ids = rand(30, 3)
    root = held_prefix(engine, root_ids)
    level1 = branches(engine, root, [rand(2, 4), rand(5, 5)], 6, eos=frozenset(), hold=True)
    drain(engine)
    # a child of branch 1 feeds the branch's last token (not yet in its KV), then its own cue
    level2 = [engine.add(Sequence(level1[1].ids + cue, 6, parent=level1[1], hold=True, depth=2))
              for cue in ([7], [8, 9])]
    drain(engine)
    level3 = engine.add(Sequence(level2[0].ids + [11], 6, parent=level2[0], depth=3))
    drain(engine)
    for s in [*level1, *level2, level3]:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 6, set())
    assert level3.out.cached_tokens == len(level2[0].ids) - 1  # the whole path shared, copy-free
    for s in [root, *level1, *level2]:
        engine.release(s)
    engine.check()
    assert engine.pool.num_used == 0


def test_prefix_index_hit_reuses_blocks_and_gives_the_same_logits():
    model = tiny_model("llama")
    engine = engine_for(model)
    ids = rand(37, 6)
    first = engine.add(Sequence(ids, keep_logits=True))
    drain(engine)
    again = engine.add(Sequence(ids, keep_logits=True))
    drain(engine)
    assert first.out.cached_tokens == 0 and again.out.cached_tokens == 36  # 9 full blocks; the last token recomputed
    assert torch.allclose(again.out.logits, first.out.logits, atol=1e-5)
    assert engine.pool.stats.hit_tokens == 36


def test_eviction_of_unrelated_blocks_keeps_tokens_exact():
    model = tiny_model("llama")
    engine = engine_for(model, blocks=24)
    for seed in range(3):  # fill the index with unrelated cached blocks
        engine.add(Sequence(rand(28, 100 + seed)))
        drain(engine)
    assert engine.pool.num_cached > 12
    prefix_ids, suffixes = rand(20, 7), [rand(3, 8), rand(2, 9)]
    prefix = held_prefix(engine, prefix_ids)
    seqs = branches(engine, prefix, suffixes, 10, eos=frozenset())
    drain(engine)
    assert engine.pool.stats.evictions > 0
    for s in seqs:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 10, set())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_eviction_policy_on_a_tight_pool_changes_no_token(policy):
    """Requests that each hold a prompt forked by two branches, six at once on a pool that fits about
    two: evictions, preemptions and held prompts giving up their blocks, and every token as generate's."""
    model = tiny_model("llama")
    engine = engine_for(model, blocks=20, evict=policy)
    headers = [rand(18, 200 + i) for i in range(3)]  # requests 3-5 repeat the headers of 0-2
    seqs = []
    for r in range(6):
        prefix = engine.add(Sequence(headers[r % 3] + [3 + r], hold=True))
        seqs += branches(engine, prefix, [rand(2, 300 + 2 * r), rand(2, 301 + 2 * r)], 12, eos=frozenset())
        engine.release(prefix)
    drain(engine)
    stats = engine.pool.stats
    assert stats.evictions > 0 and stats.hit_tokens > 0 and engine.scheduler.preemptions > 0
    for s in seqs:
        assert s.stop_reason == "length" and s.token_ids == plain_generate(model, s.prompt_ids, 12, set())
    assert engine.pool.num_used == 0


def test_a_sequence_that_can_never_fit_ends_with_a_clear_error_and_corrupts_nothing():
    model = tiny_model("llama")
    engine = engine_for(model, blocks=10)
    big = engine.add(Sequence(rand(60, 3), 4))  # 15 blocks of 4: more than the pool has
    drain(engine)
    assert big.stop_reason == "error" and "raise --kv-budget" in big.out.error
    ok = engine.add(Sequence(rand(9, 1), 4, stop_ids=frozenset()))
    drain(engine)
    assert ok.token_ids == plain_generate(model, ok.prompt_ids, 4, set())
    assert engine.pool.num_used == 0


def test_more_work_than_the_pool_holds_waits_or_is_preempted_and_stays_exact():
    model = tiny_model("qwen2")
    engine = engine_for(model, blocks=14)  # 56 token slots; each sequence grows to 8 + 24 = 32 tokens
    seqs = [engine.add(Sequence(rand(8, 40 + i), 24, stop_ids=frozenset())) for i in range(4)]
    drain(engine)
    assert engine.scheduler.preemptions > 0
    for s in seqs:
        assert s.stop_reason == "length"
        assert s.token_ids == plain_generate(model, s.prompt_ids, 24, set())
    assert engine.pool.num_used == 0


def test_sampled_sequences_do_not_depend_on_batch_or_preemption():
    model = tiny_model("llama")
    sampling = Sampling(temperature=0.9, seed=3)
    prompts = [rand(6, 60 + i) for i in range(4)]

    def run(blocks, which):
        engine = engine_for(model, blocks=blocks)
        seqs = [engine.add(Sequence(prompts[i], 20, sampling, branch=i)) for i in which]
        drain(engine)
        return [s.token_ids for s in seqs], engine.scheduler.preemptions

    together, _ = run(None, range(4))
    tight, preempted = run(12, range(4))
    alone = [run(None, [i])[0][0] for i in range(4)]
    assert together == alone == tight and preempted > 0
    assert len({tuple(t) for t in together}) == 4


def test_cancel_frees_blocks_at_once_and_others_continue():
    model = tiny_model("llama")
    engine = engine_for(model)
    prefix = held_prefix(engine, rand(20, 1))
    a, b = branches(engine, prefix, [rand(3, 2), rand(2, 3)], 30, eos=frozenset())
    engine.release(prefix)
    for _ in range(5):
        engine.step()
    used = engine.pool.num_used
    engine.cancel(a)
    engine.check()
    assert a.stop_reason == "cancelled" and a.table is None and engine.pool.num_used < used
    drain(engine)
    assert b.token_ids == plain_generate(model, b.prompt_ids, 30, set())
    waiting = engine.add(Sequence(rand(5, 9), 3))
    engine.cancel(waiting)
    assert waiting.stop_reason == "cancelled" and not engine.has_work
    assert engine.pool.num_used == 0


def test_sliding_window_layers_in_cascade_decode_match_generate():
    # Gemma 3 tiny: window 16; after ~16 own tokens the whole shared prefix falls out of the window
    model = tiny_model("gemma3")
    engine = engine_for(model)
    prefix_ids, suffixes = rand(48, 11), [rand(2, 12), rand(5, 13), rand(3, 14)]
    prefix = held_prefix(engine, prefix_ids)
    seqs = branches(engine, prefix, suffixes, 40, eos=frozenset())
    other = held_prefix(engine, rand(40, 15))  # a second problem in the same steps
    seqs += branches(engine, other, [rand(3, 16), rand(1, 17)], 40, eos=frozenset())
    engine.release(prefix)
    engine.release(other)
    drain(engine)
    for s in seqs:
        assert s.token_ids == plain_generate(model, s.prompt_ids, 40, set())


def test_programs_run_concurrently_read_token_streams_and_cancel_mid_stream():
    from rksc.engine.driver import Progress

    model = tiny_model("llama")
    engine = engine_for(model)
    prompts = [rand(12, 70 + i) for i in range(3)]

    def program(ids, stop_after):
        a, b = engine.add(Sequence(ids, 30, stop_ids=frozenset())), engine.add(Sequence(ids + [5], 30))
        while len(a.token_ids) < stop_after:
            yield Progress([a])  # resumes after every step that gives `a` a token
        engine.cancel(a)  # early exit: the rest of `a` is never computed
        yield [b]
        return a.token_ids, b.token_ids, engine.pool.num_used

    results = dict(engine.run((program(p, 4 + i) for i, p in enumerate(prompts)), concurrency=2))
    assert sorted(results) == [0, 1, 2]
    for i, p in enumerate(prompts):
        a, b, _ = results[i]
        assert a == plain_generate(model, p, 30, set())[:4 + i]
        assert b == plain_generate(model, p + [5], 30, set())
    assert max(engine.stats.rows_hist) == 4 and engine.pool.num_used == 0


def test_log_probs_are_recorded_only_for_sequences_that_ask_and_match_the_model():
    model = tiny_model("llama")
    engine = engine_for(model)
    prompt = rand(9, 80)
    asks = engine.add(Sequence(prompt, 6, stop_ids=frozenset(), logprobs=3))
    sampled = engine.add(Sequence(prompt, 6, Sampling(temperature=1.0, seed=3), stop_ids=frozenset(), logprobs=0))
    plain = engine.add(Sequence(prompt, 6, stop_ids=frozenset()))
    drain(engine)
    assert asks.token_ids == plain.token_ids == plain_generate(model, prompt, 6, set())
    assert plain.out.token_logprobs == [] and plain.out.top_logprobs == []
    with torch.no_grad():
        logits = model(torch.tensor([prompt + asks.token_ids])).logits[0, len(prompt) - 1:-1].float()
    expected = torch.log_softmax(logits, -1)
    for i, (token, chosen, top) in enumerate(zip(asks.token_ids, asks.out.token_logprobs, asks.out.top_logprobs)):
        assert [t for t, _ in top] == expected[i].topk(3).indices.tolist() and top[0][0] == token  # greedy
        assert chosen == pytest.approx(expected[i, token].item(), abs=1e-4) == top[0][1]
    assert len(sampled.out.token_logprobs) == 6 and all(top == [] for top in sampled.out.top_logprobs)
    assert sampled.out.token_logprobs == pytest.approx([math.log(p) for p in sampled.out.token_probs], abs=1e-5)
