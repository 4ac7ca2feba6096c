"""Reasoning programs on a remote backend: `rksc serve` on 127.0.0.1 (SmolLM2-135M, float32) as the
OpenAI-compatible server, rksc.engine.remote.OpenAIBackend as the client. Greedy solves give the
same branches, answers and verifier scores as the local engine; early exit cancels streams and the
server ends with no block in use; a wrong URL or model is a one-line error."""

import httpx
import pytest
import torch

from conftest import metrics, plain_generate, running, wait_idle
from rksc.cli import main
from rksc.engine.remote import OpenAIBackend
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError
from rksc.reasoning.solver import Solver, SolveConfig, eos_ids
from rksc.server.config import ServerConfig

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
PROBLEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "gold": "7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "gold": "30"},
    {"question": "Sara had 20 dollars and spent 8. How many dollars are left?", "gold": "12"},
]


@pytest.fixture(scope="module")
def server(smollm2):
    with running(ServerConfig(model=MODEL, kv_budget=256 << 20), lambda: smollm2) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def local(smollm2):
    return Solver(smollm2, kv_budget=256 << 20)


@pytest.fixture(scope="module")
def remote(server):
    solver = Solver.connect(server[0] + "/v1", MODEL)
    yield solver
    solver.close()


def test_the_probe_finds_the_model_and_what_the_server_gives(remote):
    f = remote.engine.features
    assert f.model == MODEL and f.token_ids and f.logprobs and f.top_logprobs == 20
    assert remote.lm.max_context == f.max_context and not remote.engine.warnings


def test_a_sequence_streams_the_tokens_of_plain_generate(remote, smollm2):
    ids = smollm2.tokenizer("def add(a, b):\n")["input_ids"]
    expected = plain_generate(smollm2.model, ids, 20, eos_ids(smollm2))
    seq = remote.engine.add(Sequence(ids, max_tokens=20, stop_ids=frozenset(eos_ids(smollm2))))
    steps = 0
    while remote.engine.has_work:
        steps += len(remote.engine.step()) > 0
    assert seq.token_ids == expected and seq.stop_reason in ("finished", "length")
    assert len(seq.out.token_probs) == len(expected) and all(0 < p <= 1 for p in seq.out.token_probs)
    assert steps > 1  # tokens arrived in several steps (streamed), not all at the end


@pytest.mark.parametrize("config", [
    SolveConfig(branches=3, max_new_tokens=24),  # composite: the verifier continues each branch
    SolveConfig(branches=3, max_new_tokens=24, verifier="prompt", select="verifier"),
    SolveConfig(branches=4, max_new_tokens=24, select="vote", verify=False, early_stop=("exact",)),
], ids=["composite", "prompt-verifier", "exact-early-exit"])
def test_remote_solves_equal_local_solves(remote, local, server, config):
    here = list(local.solve_many(PROBLEMS, config, concurrency=2))
    there = list(remote.solve_many(PROBLEMS, config, concurrency=2))
    assert [i for i, _ in there] == [0, 1, 2]
    for (_, a), (_, b) in zip(here, there):
        assert not isinstance(b, RkscError), b
        assert b.answer == a.answer and b.chosen == a.chosen
        if config.early_stop:  # the server frees the KV of stopped branches: not counted from here
            assert b.early["kv_freed_bytes"] is None and a.early["kv_freed_bytes"] is not None
        for x, y in zip(a.branches, b.branches):
            if config.early_stop:  # where exit cuts a branch depends on when tokens arrive; the answer cannot
                n = min(len(x.token_ids), len(y.token_ids))
                assert y.token_ids[:n] == x.token_ids[:n]
                if x.stop_reason == y.stop_reason == "finished":
                    assert y.token_ids == x.token_ids and y.answer == x.answer
                continue
            assert y.token_ids == x.token_ids and y.stop_reason == x.stop_reason and y.answer == x.answer
            assert y.confidence == pytest.approx(x.confidence, abs=1e-5)
            if x.verifier is None:
                assert y.verifier is None
            else:  # from the top-20 log-probs of one token: YES/NO spellings outside them are missed
                assert y.verifier == pytest.approx(x.verifier, abs=1e-2)
    # branches share the problem prefix on the server (its prefix index), and nothing stays in use
    assert sum(r.kv_bytes["server_cached_tokens"] for _, r in there) > 0
    wait_idle(server[0])


def test_a_cancelled_sequence_closes_its_stream_and_the_server_frees_its_blocks(remote, server, smollm2):
    ids = smollm2.tokenizer("Once upon a time, in a land far away,")["input_ids"]
    seq = remote.engine.add(Sequence(ids, max_tokens=400))
    while len(seq.token_ids) < 3 and not seq.finished:
        remote.engine.step()
    assert not seq.finished, seq.stop_reason
    assert metrics(server[0])["rksc_requests_in_flight"] == 1
    remote.engine.cancel(seq)
    assert seq.stop_reason == "cancelled" and not remote.engine.has_work
    m = wait_idle(server[0])  # the server saw the stream close and cancelled the sequence
    assert m['rksc_kv_blocks{state="used"}'] == 0 and m["rksc_requests_in_flight"] == 0


def test_a_verifier_question_reads_yes_and_no_from_the_top_log_probs(remote, local, smollm2):
    ids = smollm2.tokenizer("Is 2 + 2 = 4? Answer YES or NO.\nAnswer:")["input_ids"]
    seq = remote.engine.add(Sequence(ids, keep_logits=True))
    while not seq.finished:
        remote.engine.step()
    here = local.engine.add(Sequence(ids, keep_logits=True))
    while not here.finished:
        local.engine.step()
    assert seq.stop_reason == "prefilled" and seq.token_ids == []
    # the remote reading is exactly the local distribution cut to its top 20 tokens
    top = here.out.logits.log_softmax(-1).topk(20)
    cut = torch.full_like(here.out.logits, -torch.inf).scatter(0, top.indices, top.values)
    assert torch.equal(seq.out.logits.isfinite(), cut.isfinite())
    assert seq.out.logits[cut.isfinite()] == pytest.approx(cut[cut.isfinite()], abs=1e-4)
    score = remote.verifier.score_logits(seq.out.logits[None])[0]
    assert score == pytest.approx(local.verifier.score_logits(cut[None])[0], abs=1e-5)
    assert score == pytest.approx(local.verifier.score_logits(here.out.logits[None])[0], abs=1e-2)


def test_errors_are_one_line(server, capsys, tmp_path):
    with pytest.raises(RkscError, match="cannot reach http://127.0.0.1:9/v1"):
        Solver.connect("http://127.0.0.1:9/v1", MODEL)
    with pytest.raises(RkscError, match=f"does not serve other-model .*{MODEL}"):
        Solver.connect(server[0], MODEL, served_model="other-model")
    with pytest.raises(RkscError, match="http:// or https://"):
        Solver.connect("127.0.0.1:8000", MODEL)
    assert main(["solve", "Two plus two?", "--backend", "http://127.0.0.1:9/v1", "--model", MODEL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rksc: error: cannot reach"), err
    assert main(["solve", "Two plus two?", "--backend", server[0], "--model", MODEL, "--cache", "none"]) == 2
    assert "--backend runs the engine path" in capsys.readouterr().err
    assert main(["bench", "--backend", server[0], "--model", MODEL, "--conditions", "naive,rksc",
                 "--out", str(tmp_path / "bench")]) == 2
    assert "need the local model" in capsys.readouterr().err


def test_a_request_the_server_refuses_fails_its_problem_with_the_servers_message(remote):
    long = "word " * 9000  # beyond SmolLM2's 8192-token context: the server answers 400
    seq = remote.engine.add(Sequence(remote.lm.tokenizer(long)["input_ids"], max_tokens=4))
    while not seq.finished:
        remote.engine.step()
    assert seq.stop_reason == "error" and seq.out.error.startswith("400 from ") and "context" in seq.out.error


def test_the_backend_streams_without_blocking_other_requests(server, smollm2):
    backend = OpenAIBackend(server[0], smollm2.tokenizer, eos_ids(smollm2), max_inflight=2)
    try:
        ids = smollm2.tokenizer("Once upon a time")["input_ids"]
        seqs = [backend.add(Sequence(ids, max_tokens=8)) for _ in range(3)]  # the third waits for a slot
        while backend.has_work:
            backend.step()
        assert all(s.stop_reason in ("finished", "length") for s in seqs)
        assert seqs[0].token_ids == seqs[1].token_ids == seqs[2].token_ids  # greedy (temperature 0)
        assert httpx.get(server[0] + "/health", timeout=10).status_code == 200
    finally:
        backend.close()


def test_text_prompts_give_the_solves_of_token_id_prompts(server, local):
    """The fallback for servers that refuse token-id prompts (llama-cpp-python, Ollama, LM Studio):
    prompts go as text, tokenised on the server. The prompts rksc builds round-trip through the
    tokenizer (tests/test_remote_formats.py), so the greedy vote solves are the local ones."""
    solver = Solver.connect(server[0] + "/v1", MODEL)
    try:
        solver.engine.features.text_prompts = True  # as the probe sets it for a server that refuses ids
        config = SolveConfig(branches=3, max_new_tokens=24, select="vote", verify=False)
        here = dict(local.solve_many(PROBLEMS, config, concurrency=2))
        there = dict(solver.solve_many(PROBLEMS, config, concurrency=2))
        for i in range(len(PROBLEMS)):
            assert [b.token_ids for b in there[i].branches] == [b.token_ids for b in here[i].branches]
            assert there[i].answer == here[i].answer
    finally:
        solver.close()
