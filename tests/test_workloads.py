"""Bench workloads in which every branch has its own context (rksc.bench.workloads): each branch's prompt is
written whole and the shared prefix is what they all begin with, so a solve equals plain `generate` on
every branch's own prompt (fp32); the contexts vary as each workload says; bad contexts are user errors."""

import json

import pytest

from conftest import plain_generate
from rksc.bench import workloads
from rksc.bench.datasets import load_problems
from rksc.bench.harness import BenchConfig, run_bench
from rksc.errors import RkscError
from rksc.reasoning.config import SolveConfig
from rksc import validate
from rksc.reasoning.solver import Solver, contexts

pytestmark = pytest.mark.slow
QUESTION = "Tom has 3 apples and buys 5 more. He gives 2 to Ann. How many apples does Tom have now?"


@pytest.fixture(scope="module")
def examples():
    return workloads.pool()


@pytest.fixture(scope="module")
def solver(smollm2):
    return Solver(smollm2, kv_budget=64 << 20)


def laid_out(solver, workload, examples, branches=8, index=0):
    contexts = workloads.contexts(workload, index, branches, examples)
    return contexts, solver.problem(QUESTION, SolveConfig(branches=branches), contexts_of(contexts))


def contexts_of(dicts):
    """Per-branch context dicts as Solver.problem takes them, the way a solve converts them."""
    return contexts(validate.problem(QUESTION, None, dicts)[2])


@pytest.mark.parametrize("workload", workloads.CONTEXTS)
def test_the_prefix_is_the_longest_start_every_branch_shares_and_each_prompt_is_whole(solver, examples, workload):
    _, problem = laid_out(solver, workload, examples)
    prompts = [problem.prefix.ids + s.ids for s in problem.suffixes]
    assert all(s.ids for s in problem.suffixes)
    assert len({tuple(s.ids[:1]) for s in problem.suffixes}) > 1  # the prefix cannot be one token longer
    tok = solver.lm.tokenizer
    for ids in prompts:
        text = tok.decode(ids)
        assert QUESTION in text and text.startswith(tok.decode(problem.prefix.ids))
    assert len(set(map(tuple, prompts))) == len(prompts)  # every branch reads its own prompt


def test_each_workload_varies_its_context_as_it_says(examples):
    few = workloads.contexts("fewshot", 0, 8, examples)
    shots = [[p.question for p in examples if p.question in c["preamble"]] for c in few]
    assert all(len(s) == workloads.SHOTS for s in shots)
    assert all(len(set(shots[i]) & set(shots[i + 1])) == workloads.SHOTS - 1 for i in range(7))  # a sliding window
    rag = workloads.contexts("rag", 0, 8, examples)
    passages = [[p.question for p in examples if p.question in c["preamble"]] for c in rag]
    assert all(set(p) == set(passages[0]) and len(p) == workloads.PASSAGES for p in passages)  # the same passages
    firsts = [min(p, key=c["preamble"].index) for p, c in zip(passages, rag)]
    assert len(set(firsts)) == workloads.PASSAGES  # ... in other orders
    chat = workloads.contexts("chat-edit", 0, 8, examples)
    earlier = [c["history"][0]["content"] for c in chat]
    assert earlier[0] == examples[0].question and len(set(earlier)) == 8  # each branch's own edit
    assert {c["history"][1]["content"] for c in chat} == {examples[0].solution}  # the answer after it kept
    assert workloads.contexts("standard", 0, 8, examples) is None
    assert workloads.contexts("fewshot", 1, 8, examples) != few  # problems get other examples


def test_a_solve_with_branch_contexts_equals_generate_on_each_branchs_prompt(solver, examples):
    """fp32: the shared prefix computed once, each branch's rest on top of it, is plain generate on the
    branch's whole prompt, token for token."""
    contexts = workloads.contexts("chat-edit", 3, 2, examples)
    config = SolveConfig(branches=2, max_new_tokens=8, verify=False, select="vote")
    result = solver.solve(QUESTION, config, context=contexts)
    for branch in result.branches:
        assert branch.token_ids == plain_generate(solver.lm.model, branch.prompt_ids, 8, solver.eos)
    assert solver.engine.pool.num_used == 0


@pytest.mark.parametrize("context, message", [
    ([{"preamble": "x"}] * 2, "2 branch contexts for 3 branches"),
    ([{"history": [{"role": "system", "content": "x"}]}] * 3, "history\\[0\\] must be"),
    ([{"preamble": "x", "extra": 1}] * 3, "unknown keys"),
    ([{"history": "hello"}] * 3, "must be a list of messages"),
    (["text"] * 3, "must be a dict with history and preamble"),
    ([], "empty list"),
])
def test_bad_branch_contexts_are_one_line_errors(solver, context, message):
    with pytest.raises(RkscError, match=message):
        solver.solve(QUESTION, SolveConfig(branches=3, max_new_tokens=2), context=context)


def test_branch_contexts_refuse_the_diverse_layout(solver):
    with pytest.raises(RkscError, match="use layout 'shared'"):
        solver.solve(QUESTION, SolveConfig(branches=2, max_new_tokens=2, layout="diverse"),
                     context=[{"preamble": "a"}, {"preamble": "b"}])


def test_bench_runs_a_workload_with_branch_contexts_and_the_baseline_reads_the_same_prompts(smollm2, tmp_path):
    """Greedy fp32: the No-KV baseline and the engine decode the same branch prompts, so their branches
    answer alike; the prefix they share reaches the edit in the earlier turn."""
    workload = "chat-edit"
    config = BenchConfig(model="smollm2-135m", dtype="float32", limit=1, branches=2, max_new_tokens=6,
                         regime="natural", conditions=("nokv", "rksc"), warmup=0, resamples=200,
                         out=str(tmp_path), plots=False, workload=workload)
    summary = run_bench(config, solver=Solver(smollm2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert summary["config"]["workload"] == workload and len(records) == 2
    assert len({tuple(r["branch_answers"]) for r in records}) == 1
    question = load_problems("gsm8k", 0, 1)[0].question
    contexts = workloads.contexts(workload, 0, 2, workloads.pool())
    prefix = Solver(smollm2).problem(question, SolveConfig(branches=2), contexts_of(contexts)).prefix
    assert {r["prefix_tokens"] for r in records} == {len(prefix.ids)}
    assert question not in prefix.text  # each branch's context comes before its problem
    earlier = contexts[0]["history"][0]["content"]  # shared up to the edited number of the earlier question
    number = workloads._NUMBER.search(earlier)
    assert prefix.text.endswith(earlier[:number.start()].split()[-1] + " ")
