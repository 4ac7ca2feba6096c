"""CLI behaviour for users: clear one-line errors with exit code 2, and batch files."""

import json
import subprocess
import sys

import pytest

from rksc.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["solve", ""], "question is empty"),
    (["solve", "   "], "question is empty"),
    (["solve"], "give a question or --file"),
    (["solve", "2+2?", "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["solve", "2+2?", "--model", "./nowhere/model"], "model folder not found"),
    (["solve", "--file", "does-not-exist.jsonl"], "file not found: does-not-exist.jsonl"),
    (["solve", "2+2?", "--branches", "0"], "branches must be at least 1"),
    (["solve", "2+2?", "--max-new-tokens", "0"], "max-new-tokens must be at least 1"),
    (["solve", "2+2?", "--select", "magic"], "invalid choice: 'magic'"),
    (["solve", "2+2?", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["solve", "2+2?", "--weights", "int3"], "argument --weights: invalid choice: 'int3'"),
    (["solve", "2+2?", "--dtype", "float32", "--weights", "bf16"], "--weights bf16 computes in bfloat16"),
    (["serve", "--dtype", "bfloat16", "--weights", "fp32"], "--weights fp32 computes in float32"),
    (["info", "--dtype", "float16", "--weights", "fp32"], "--weights fp32 computes in float32"),
    (["solve", "2+2?", "--temperature", "-1"], "temperature must be >= 0"),
    (["solve", "2+2?", "--branches", "two"], "invalid int value"),
    (["solve", "2+2?", "--threads", "-1"], "threads must be at least 1"),
    (["solve", "--file", "p.jsonl", "--concurrency", "0"], "concurrency must be at least 1"),
    (["models", "pull", "gpt-5"], "unknown model 'gpt-5'"),
    (["solve", "2+2?", "--model", "smollm2-135m", "--asks", "on"], "--asks on needs a similarity threshold"),
    (["solve", "2+2?", "--asks", "maybe"], "invalid choice: 'maybe'"),
    (["solve", "2+2?", "--asks", "on"], "no setting passed its answer guard"),  # its shipped calibration
    (["asks-calibrate", "--limit", "10"], "a bound of 1% needs at least 299 problems"),
    (["asks-calibrate", "--target", "0"], "target must be"),
    (["solve", "2+2?", "--asks", "on", "--asks-tau", "0.5", "--asks-recompute", "2"], "asks-recompute must be"),
    (["asks-curve", "--recompute", "0.1,x"], "--recompute takes comma-separated fractions"),
    (["bench", "--model", "smollm2-135m", "--conditions", "asks"], "--asks on needs a similarity threshold"),
    (["solve", "2+2?", "--thresholds", "exit_margin"], "thresholds are field=value pairs"),
    (["solve", "2+2?", "--thresholds", "speed=2"], "unknown threshold 'speed'"),
    (["bench", "--thresholds", "exit_patience=1.5"], "exit-patience must be an integer"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rksc: error: ")
    assert "Traceback" not in err and out == ""


def test_real_entry_point_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "rksc.cli", "solve", ""], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rksc: error: the question is empty"


def test_models_list_shows_every_registry_model(capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma-3-270m"):
        assert name in out


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_a_user_error(capsys):
    code, _, err = run(capsys, "solve", "2+2?", "--model", "smollm2-135m", "--max-new-tokens", "9000")
    assert code == 2 and "prompt too long" in err and "context of 8192" in err


@pytest.mark.slow
def test_batch_file_reports_bad_lines_and_still_runs_the_rest(capsys, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join([
        json.dumps({"id": "a", "question": "What is 2 plus 3?", "answer": "5"}),
        "{not json",
        json.dumps({"question": ""}),
        "",
        json.dumps({"id": "b", "question": "What is 10 minus 4?", "answer": "#### 6"}),
    ]) + "\n")
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "solve", "--file", str(problems), "--out", str(out_file), "--model",
                       "smollm2-135m", "-b", "2", "-n", "4", "--no-verify", "--concurrency", "2")
    assert code == 2 and "(2 in flight)" in err
    assert f"{problems}:2: not valid JSON" in err and f"{problems}:3: expected an object" in err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5]
    assert [r.get("id") for r in records if "error" not in r] == ["a", "b"]
    assert records[3]["gold"] == "6" and len(records[0]["branches"]) == 2
    assert "solved 2 of 4 problems" in err


@pytest.mark.slow
def test_solve_json_gives_prompts_and_token_ids(capsys):
    code, out, _ = run(capsys, "solve", "What is 6 times 7?", "--model", "smollm2-135m", "-b", "3", "-n", "6",
                       "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["branches"]) == 3 and result["model"] == "smollm2-135m"
    for b in result["branches"]:
        assert b["prompt_text"].endswith("assistant\n") and "What is 6 times 7?" in b["prompt_text"]
        assert len(b["token_ids"]) == b["tokens"] <= 6 and b["prompt_ids"]
    assert set(result["timing"]) >= {"prefill_s", "decode_s", "verify_s", "total_s", "decode_tok_s"}


@pytest.mark.slow
def test_kv_budget_too_small_is_a_clear_error(capsys):
    code, _, err = run(capsys, "solve", "2+2?", "--model", "smollm2-135m", "--kv-budget", "1M", "-n", "4")
    assert code == 2 and "rksc: error:" in err and "block" in err and len(err.strip().splitlines()) == 1


def test_bad_sizes_and_tree_flags(capsys):
    for argv, message in ((["--kv-budget", "lots"], "not a size"), (["--depth", "0"], "depth must be at least 1"),
                          (["--depth", "2", "--cache", "shared"], "run on the block pool")):
        code, _, err = run(capsys, "solve", "2+2?", *argv)
        assert code == 2 and message in err


def one_line_error(code, out, err, *fragments):
    assert code == 2 and out == "" and err.startswith("rksc: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("damage", ["truncate", "delete-config"])
def test_damaged_model_cache_is_reported_by_list_solve_and_verify(capsys, tmp_path, monkeypatch, damage):
    from conftest import fake_prepared

    monkeypatch.setenv("RKSC_HOME", str(tmp_path))
    folder = fake_prepared(tmp_path)
    if damage == "truncate":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:20])
    else:
        (folder / "config.json").unlink()
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "DAMAGED" in out and "rksc models pull smollm2-135m --force" in " ".join(out.split())
    one_line_error(*run(capsys, "solve", "2+3?", "--model", "smollm2-135m"),
                   "smollm2-135m", "is damaged", "repair it with: rksc models pull smollm2-135m --force")
    one_line_error(*run(capsys, "models", "verify", "smollm2-135m"), "is damaged", "--force")


def test_models_verify_checks_hashes(capsys, tmp_path, monkeypatch):
    from conftest import fake_prepared

    monkeypatch.setenv("RKSC_HOME", str(tmp_path))
    one_line_error(*run(capsys, "models", "verify", "smollm2-135m"), "not prepared", "rksc models pull smollm2-135m")
    fake_prepared(tmp_path)
    code, out, _ = run(capsys, "models", "verify", "smollm2-135m")
    assert code == 0 and "smollm2-135m: 3 files match their sha256" in out


def test_rksc_home_that_is_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("RKSC_HOME", str(tmp_path / "home"))
    for argv in (["models", "list"], ["solve", "2+3?", "--model", "smollm2-135m"], ["models", "pull", "smollm2-135m"]):
        one_line_error(*run(capsys, *argv), "RKSC_HOME", "is a file, not a folder")


def test_model_files_that_are_not_models_are_one_line(capsys, tmp_path):
    from conftest import fake_model_folder

    (tmp_path / "garbage.gguf").write_bytes(b"garbage bytes here")
    one_line_error(*run(capsys, "solve", "2+3?", "--model", str(tmp_path / "garbage.gguf")), "not a GGUF file")
    fake_model_folder(tmp_path / "bad-config")
    (tmp_path / "bad-config" / "config.json").write_text("{bad")
    one_line_error(*run(capsys, "solve", "2+3?", "--model", str(tmp_path / "bad-config")),
                   "config.json is not valid JSON")
    fake_model_folder(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    one_line_error(*run(capsys, "solve", "2+3?", "--model", str(tmp_path / "no-weights")), "holds no weights")
    fake_model_folder(tmp_path / "unloadable")  # passes the cheap checks, transformers refuses it: one line too
    one_line_error(*run(capsys, "solve", "2+3?", "--model", str(tmp_path / "unloadable")), "cannot load model")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model (checks must come first)."""
    from rksc.reasoning.solver import Solver

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Solver, "load", load)


def test_output_and_argument_mistakes_are_found_before_loading(capsys, tmp_path, no_model_load):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "What is 2+3?"}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "cal1").mkdir()
    (tmp_path / "cal1" / "meta.json").write_text("{}")
    batch = ["solve", "--file", str(problems), "--model", "smollm2-135m"]
    for argv, fragments in [
        (batch + ["--out", "/nonexistent/x.jsonl"], ["folder /nonexistent does not exist"]),
        (batch + ["--out", str(tmp_path / "folder")], ["is a folder; give a file name"]),
        (batch + ["--out", str(problems)], ["is the input file"]),  # used to overwrite the problems
        (batch + ["--kv-budget", "inf"], ["not a size: 'inf'"]),
        (batch + ["--kv-budget", "1e15"], ["more than this machine's memory"]),
        (batch + ["--temperature", "inf"], ["temperature must be a finite number"]),
        (batch + ["--block-size", "0"], ["block-size must be at least 1"]),
        (["solve", "What is \udcff?"], ["question is not valid UTF-8 (byte 0xff at character 9)"]),
        (["bench", "--out", str(tmp_path / "file")], ["is a file; this writes a folder"]),
        (["bench", "--out", str(tmp_path / "file" / "below")], ["is a file, not a folder"]),
        (["bench", "--prefix-tokens", "-5"], ["prefix-tokens must be at least 0"]),
        # a folder the permission bits allow but the kernel refuses: found by creating it
        (["bench", "--out", "/proc/rksc-out"], ["--out /proc/rksc-out: "]),
        (["asks-curve", "--out", "/proc/rksc-out"], ["--out /proc/rksc-out: "]),
        (["calibrate", "--out", "/proc/rksc-out"], ["--out /proc/rksc-out: "]),
        (["calibrate", "--split", "1318-1019"], ["--split takes FIRST-LAST problem indices"]),
        (["calibrate", "--order-from", str(tmp_path / "folder")], ["not an `rksc calibrate` folder"]),
        (["calibrate", "--order-from", str(tmp_path / "cal1"), "--out", str(tmp_path / "cal1")],
         ["--order-from and --out are both"]),
        (["calibrate", "--split", "1019-1318", "--limit", "5"], ["either --split or --offset/--limit"]),
        (["calibrate", "--out", str(tmp_path / "cal"), "--profile", "/proc/rksc-out/p.json"],
         ["--profile /proc/rksc-out: "]),
        (["bench", "--conditions", ""], ["no conditions given; choose from"]),
        (["bench", "--conditions", " , "], ["no conditions given"]),
    ]:
        one_line_error(*run(capsys, *argv), *fragments)
    assert not (tmp_path / "cal").exists()  # a folder made to prove --out writable is removed again


def test_reader_reports_each_bad_line_and_keeps_the_rest(tmp_path):
    from rksc.cli.batch import read_problems

    lines = [
        b'{"question": "What is 2+3?", "answer": "1e999"}',
        b'{"question": "caf\xe9?"}',  # Latin-1, not UTF-8: was a UnicodeDecodeError before anything ran
        b'{"question": "What is \\ud800?"}',  # a lone surrogate: was a TypeError that lost later lines
        b"[" * 200_000,  # was a RecursionError
        b'{"question": "big", "n": ' + b"7" * 5000 + b"}",  # an int past Python's digit limit
        b"",
        b'\xef\xbb\xbf{"question": "BOM inside a line"}',
        b'{"question": "What is 1+1?", "answer": "inf"}\r',
    ]
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    rows = read_problems(str(tmp_path / "p.jsonl"))
    assert [n for n, _, _ in rows] == [1, 2, 3, 4, 5, 7, 8]
    errors = {n: e for n, _, e in rows if e}
    assert errors[2] == "not valid UTF-8 (byte 0xe9 at column 18)"
    assert "lone surrogate U+D800" in errors[3]
    assert errors[4] == "not valid JSON here (nested too deeply)"
    assert "not valid JSON here" in errors[5] and "4300" in errors[5]
    assert "not valid JSON" in errors[7]
    assert rows[0][1]["answer"] == "1e999" and rows[-1][1]["question"] == "What is 1+1?"
    assert all("\n" not in e for e in errors.values())


def test_closed_output_pipe_ends_quietly():
    # `rksc ... | head`: the reader goes away; no BrokenPipeError traceback, exit 0
    proc = subprocess.Popen([sys.executable, "-m", "rksc.cli", "models", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""


def test_ctrl_c_during_start_up_is_one_line():
    import signal
    import time

    # as from a terminal: SIGINT at its default (a parent that ignores it, as the test runner may by
    # then, would pass SIG_IGN on and the interrupt would never arrive)
    proc = subprocess.Popen([sys.executable, "-m", "rksc.cli", "solve", "What is 2+3?", "--model", "smollm2-135m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)  # inside the imports of torch and transformers, or the model load
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.decode().strip().splitlines() == ["rksc: interrupted"]


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, rksc.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_batch_with_bad_lines_and_odd_golds_reports_them_and_runs_the_rest(capsys, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_bytes(b"\n".join([
        b'{"id": "a", "question": "What is 2+3?", "answer": "1e999"}',  # gold past the float range
        b'{"question": "caf\xe9?"}',
        b'{"question": "What is \\ud800?"}',
        b"[" * 200_000,
        b'{"id": "b", "question": "What is 4+4?", "answer": "nan"}',
        b'{"id": "c", "question": "What is 1+1?", "answer": "inf"}',
    ]) + b"\n")
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "solve", "--file", str(problems), "--out", str(out_file), "--model",
                       "smollm2-135m", "-b", "2", "-n", "8", "--no-verify")
    assert code == 2 and "Traceback" not in err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("id") for r in records if "error" not in r] == ["a", "b", "c"]
    assert all(r["correct"] is False for r in records if "error" not in r)
    assert f"{problems}:2: not valid UTF-8" in err and f"{problems}:4: not valid JSON here" in err
    assert "solved 3 of 6 problems" in err and "3 bad line(s)" in err
