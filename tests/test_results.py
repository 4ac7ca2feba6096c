"""Resumable --out of a batch: a rerun solves only the lines missing from it, keeps the file in
input order, drops a line cut short by a crash and refuses a file of other problems or settings
(the same on Ray workers: tests/test_ray.py)."""

import json

import pytest

from conftest import GSM8K_SAMPLE as SAMPLE, problems_file, run


@pytest.fixture
def no_model_load(monkeypatch):
    from rksc.reasoning.solver import Solver

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Solver, "load", load)


def fake_record(line: int, question: str, **config) -> str:
    from dataclasses import asdict

    from rksc.reasoning.solver import SolveConfig

    return json.dumps({"line": line, "id": None, "question": question, "answer": "18", "model": "smollm2-135m",
                       "config": asdict(SolveConfig(**config)), "correct": True})


def test_out_of_other_problems_or_settings_is_refused_before_loading(capsys, tmp_path, no_model_load):
    problems = problems_file(tmp_path)
    first = json.loads(SAMPLE.read_text().splitlines()[0])["question"]
    out = tmp_path / "out.jsonl"
    argv = ["solve", "--file", problems, "--out", out, "--model", "smollm2-135m", "-b", "3"]
    for content, message in (
        (fake_record(1, first, branches=2), "holds results of other settings (branches 2 there, 3 now)"),
        (fake_record(2, first, branches=3), "holds a result for another problem at line 2"),
        ("just some notes\n" + fake_record(1, first, branches=3), "is not an rksc results file (line 1"),
    ):
        out.write_text(content + "\n")
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and "give another --out or delete it" in err
        assert out.read_text() == content + "\n"  # left as it was


def test_out_holding_every_line_loads_no_model_and_is_left_in_order(capsys, tmp_path, no_model_load):
    questions = [json.loads(line)["question"] for line in SAMPLE.read_text().splitlines()[:2]]
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "out.jsonl"
    second, first = fake_record(2, questions[1], branches=3), fake_record(1, questions[0], branches=3)
    out.write_text(second + "\n" + first + "\n" + first[:40])  # out of order, and a line cut short
    code, _, err = run(capsys, "solve", "--file", problems, "--out", out, "--model", "smollm2-135m", "-b", "3")
    assert code == 0 and "already holds results for 2 of 2 lines" in err
    assert "solved 2 of 2 problems (2 in an earlier run)" in err and "accuracy 2/2" in err
    assert out.read_text() == first + "\n" + second + "\n"


def test_results_file_fills_gaps_and_ends_in_input_order(tmp_path):
    from rksc.reasoning.solver import SolveConfig
    from rksc.results import ResultsFile

    problems = [(n, {"question": f"q{n}"}, None) for n in (1, 2, 4, 5)]
    out = tmp_path / "out.jsonl"
    kept = [fake_record(n, f"q{n}") for n in (2, 5)]
    out.write_text(kept[0] + "\n" + json.dumps({"line": 4, "error": "too long"}) + "\n" + kept[1])  # no final newline
    results = ResultsFile(str(out), problems, SolveConfig(), "smollm2-135m")
    assert results.done == {2: True, 5: True}
    results.open()
    assert out.read_text() == kept[0] + "\n" + kept[1] + "\n"  # the error dropped, the last line ended
    for n in (1, 4):
        results.write({"line": n, "question": f"q{n}"})
    results.close()
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 4, 5]
