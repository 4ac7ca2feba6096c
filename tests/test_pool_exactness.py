"""The paged block pool changes no token: forks, trees, prefix-index hits and evictions included."""

import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model
from rksc.cache import PoolExhausted
from rksc.engine.decode import collect, decode
from rksc.engine.pool_runner import PoolRunner
from rksc.engine.sampler import Sampler, Sampling
from rksc.errors import RkscError
from test_exactness import plain_generate


def rand(n, seed):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(runner, prefix, suffixes, n, eos=frozenset({0})):
    batch, logits = runner.extend(prefix, suffixes)
    traces = collect(decode(runner, batch, logits, Sampler(Sampling(), len(suffixes)), n, set(eos)), len(suffixes))
    return batch, traces


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pool_branches_match_generate(family):
    model = tiny_model(family)
    runner = PoolRunner.create(model, budget_bytes=1 << 22, block_size=4)
    prefix_ids = rand(42, 1)
    suffixes = [rand(n, 10 + n) for n in (1, 5, 3, 9, 2)]
    prefix = runner.prefill(prefix_ids)
    batch, traces = run(runner, prefix, suffixes, 24)
    for s, t in zip(suffixes, traces):
        assert t.token_ids == plain_generate(model, prefix_ids + s, 24, {0})
    runner.pool.check([prefix.table, *batch.tables])


def test_prefix_is_held_once_and_memory_grows_by_suffixes_only():
    model = tiny_model("llama")
    runner = PoolRunner.create(model, budget_bytes=1 << 23, block_size=4)
    prefix = runner.prefill(rand(64, 2))  # 16 full blocks
    per_block = runner.block_bytes
    for branches in (1, 4, 8):
        batch, traces = run(runner, prefix, [rand(3, 20 + i) for i in range(branches)], 5, eos=frozenset())
        own_blocks = sum(len(t.blocks) - 16 for t in batch.tables)
        assert batch.kv_bytes == (16 + own_blocks) * per_block
        assert own_blocks == branches * 2  # 3 suffix + 5 new tokens - 1 not yet written = 7 -> 2 blocks
        assert batch.kv_bytes < branches * prefix.nbytes or branches == 1
        runner.release(batch)
    runner.release(prefix)
    runner.pool.check([])


def test_tree_forks_at_several_depths_match_generate():
    model = tiny_model("qwen2")
    runner = PoolRunner.create(model, budget_bytes=1 << 22, block_size=4)
    root_ids = rand(30, 3)
    root = runner.prefill(root_ids)
    level1, t1 = run(runner, root, [rand(2, 4), rand(5, 5)], 6, eos=frozenset())
    # fork branch 1 after its 6 new tokens (KV written for 5 of them; the 6th is fed by the child)
    parent = runner.fork(level1, 1, depth=2)
    child_suffixes = [[t1[1].token_ids[-1], 7], [t1[1].token_ids[-1], 8, 9]]
    level2, t2 = run(runner, parent, child_suffixes, 6, eos=frozenset())
    parent2 = runner.fork(level2, 0, depth=3)
    level3, t3 = run(runner, parent2, [[t2[0].token_ids[-1], 11]], 6, eos=frozenset())
    path1 = root_ids + [rand(5, 5)][0] + t1[1].token_ids[:-1]
    for s, t in zip(child_suffixes, t2):
        assert t.token_ids == plain_generate(model, path1 + s, 6, set())
    path2 = path1 + child_suffixes[0] + t2[0].token_ids[:-1]
    assert t3[0].token_ids == plain_generate(model, path2 + [t2[0].token_ids[-1], 11], 6, set())
    # level-1 siblings are untouched by their children's writes (copy-on-write)
    assert t1[0].token_ids == plain_generate(model, root_ids + rand(2, 4), 6, set())
    runner.pool.check([root.table, parent.table, parent2.table, *level1.tables, *level2.tables, *level3.tables])


def test_prefix_index_hit_reuses_blocks_and_gives_the_same_logits():
    model = tiny_model("llama")
    runner = PoolRunner.create(model, budget_bytes=1 << 22, block_size=4)
    ids = rand(37, 6)
    first = runner.prefill(ids)
    first_blocks = list(first.table.blocks)
    runner.release(first)
    again = runner.prefill(ids)
    assert first.cached_tokens == 0 and again.cached_tokens == 36  # 9 full blocks; the last token recomputed
    assert again.table.blocks[:9] == first_blocks[:9]
    assert torch.allclose(again.last_logits, first.last_logits, atol=1e-5)
    assert runner.pool.stats.hit_tokens == 36


def test_eviction_of_unrelated_blocks_keeps_tokens_exact():
    model = tiny_model("llama")
    block_bytes = PoolRunner.create(model, budget_bytes=1 << 20, block_size=4).block_bytes
    runner = PoolRunner.create(model, budget_bytes=24 * block_bytes, block_size=4)  # 24 blocks
    for seed in range(3):  # fill the index with unrelated cached blocks
        runner.release(runner.prefill(rand(28, 100 + seed)))
    assert runner.pool.num_cached > 12
    prefix_ids, suffixes = rand(20, 7), [rand(3, 8), rand(2, 9)]
    prefix = runner.prefill(prefix_ids)
    batch, traces = run(runner, prefix, suffixes, 10, eos=frozenset())
    assert runner.pool.stats.evictions > 0
    for s, t in zip(suffixes, traces):
        assert t.token_ids == plain_generate(model, prefix_ids + s, 10, set())


def test_exhausted_pool_is_a_clear_error_and_corrupts_nothing():
    model = tiny_model("llama")
    block_bytes = PoolRunner.create(model, budget_bytes=1 << 20, block_size=4).block_bytes
    runner = PoolRunner.create(model, budget_bytes=10 * block_bytes, block_size=4)
    prefix_ids = rand(20, 7)
    prefix = runner.prefill(prefix_ids)  # 5 blocks held
    with pytest.raises(PoolExhausted) as err:
        run(runner, prefix, [rand(9, i) for i in range(4)], 4)
    assert isinstance(err.value, RkscError)
    runner.pool.check([prefix.table])
    batch, traces = run(runner, prefix, [rand(2, 1)], 4, eos=frozenset())  # still works afterwards
    assert traces[0].token_ids == plain_generate(model, prefix_ids + rand(2, 1), 4, set())


def test_sliding_window_layers_in_cascade_decode_match_generate():
    # Gemma 3 tiny: window 16; after ~16 own tokens the whole shared prefix falls out of the window
    model = tiny_model("gemma3")
    runner = PoolRunner.create(model, budget_bytes=1 << 22, block_size=4)
    prefix_ids, suffixes = rand(48, 11), [rand(2, 12), rand(5, 13), rand(3, 14)]
    batch, traces = run(runner, runner.prefill(prefix_ids), suffixes, 40, eos=frozenset())
    for s, t in zip(suffixes, traces):
        assert t.token_ids == plain_generate(model, prefix_ids + s, 40, set())
