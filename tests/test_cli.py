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
    (["solve", "2+2?", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["solve", "2+2?", "--temperature", "-1"], "temperature must be >= 0"),
    (["solve", "2+2?", "--branches", "two"], "invalid int value"),
    (["solve", "2+2?", "--threads", "-1"], "threads must be at least 1"),
    (["models", "pull", "gpt-5"], "unknown model 'gpt-5'"),
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
                       "smollm2-135m", "-b", "2", "-n", "4", "--no-verify")
    assert code == 2
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
