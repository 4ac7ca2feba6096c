"""Fuzz tests for everything that takes outside input: whatever comes in, the answer is a result or
one RkscError line (a reported line in a batch), never another exception or a traceback.

Kept fast (a few seconds in all); CI runs them derandomized (tests/conftest.py, profile "ci").
"""

import contextlib
import io
import json
import string

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from rksc import validate
from rksc.bench.harness import BenchConfig
from rksc.cache import pool_args
from rksc.cli import main
from rksc.cli.batch import parse_problem_line, read_problems
from rksc.errors import RkscError
from rksc.reasoning import answers
from rksc.reasoning.solver import SolveConfig, solver_args

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text that is mostly numbers and answer phrasing, so the extractors' interesting paths are hit
NUMBERISH = st.lists(st.sampled_from(list("0123456789.,-+/$eE #{}\\():ABCDE\n") +
                                     ["inf", "nan", "answer is ", "\\boxed{", "####", "9" * 320, "1e999"]),
                     max_size=30).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=60), NUMBERISH,
                     st.text(alphabet=st.characters(blacklist_categories=()), max_size=20))  # surrogates too


# the JSONL reader -------------------------------------------------------------------------------

def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                        st.just("\ud800"), st.just(""))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)


PROBLEM_OBJECTS = st.fixed_dictionaries({"question": st.one_of(ANY_TEXT, _json_values())},
                                        optional={"answer": _json_values(), "id": _json_values()})
LINES = st.one_of(
    st.binary(max_size=80),
    ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    _json_values().map(lambda v: json.dumps(v).encode()),
    PROBLEM_OBJECTS.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.integers(1, 50_000).map(lambda n: b"[" * n),
)


@FAST
@given(LINES)
@example(b"[" * 200_000)
@example(b'{"question": "x", "n": ' + b"7" * 5000 + b"}")
@example(b'{"question": "\\ud800"}')
@example(b'{"question": "caf\xe9"}')
def test_every_jsonl_line_is_a_problem_or_a_reported_error(raw):
    parsed = parse_problem_line(raw)
    if parsed is None:  # blank
        assert not raw.strip(b" \t\r\n\x0b\x0c") or not raw.decode("utf-8", "replace").strip()
        return
    item, error = parsed
    event("problem" if error is None else "reported: " + error.split(" (")[0][:30])
    assert (item is None) != (error is None)
    if error is not None:
        assert isinstance(error, str) and error and "\n" not in error
    else:
        validate.question(item["question"])  # what the solver gets is a valid, non-empty question


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINES, min_size=1, max_size=6))
@example([b"\xef\xbb\xbf"])  # a file that is only a byte-order mark holds no problems
def test_a_batch_file_yields_one_row_per_non_blank_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("batch") / "p.jsonl"
    data = b"\n".join(lines)
    path.write_bytes(data)
    # the file's own byte-order mark is not part of its first line
    expected = [n for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1)
                if parse_problem_line(raw) is not None]
    try:
        rows = read_problems(str(path))
    except RkscError as e:
        assert not expected and "holds no problems" in str(e)
        return
    assert [n for n, _, _ in rows] == expected


# answer extraction and comparison ----------------------------------------------------------------

@FAST
@given(ANY_TEXT, ANY_TEXT, st.sampled_from(["number", "choice", "math"]))
@example("The answer is " + "9" * 400, "1e999", "number")
@example("1e400/1e399", "nan", "math")
def test_extraction_and_comparison_never_raise(text, gold, kind):
    found = answers.extract(text, kind, answers.choice_letters(text) or "ABCDE")
    assert found is None or isinstance(found, str)
    for a in (found, text):
        same = answers.same_answer(a, gold)
        assert same == answers.same_answer(gold, a)  # symmetric
    assert answers.same_answer(gold, gold)  # reflexive, whatever the gold
    number = answers.normalize_number(text)
    assert number is None or (isinstance(number, str) and number)
    answers.gsm8k_gold(text)
    answers.normalize_math(text)


# size and number arguments -----------------------------------------------------------------------

SIZES = st.one_of(
    st.text(max_size=20),
    st.from_regex(r"\s*[0-9.]{0,8}([eE][+-]?[0-9]{0,6})?\s*[KMGTkmgtXx]?[iI]?[bB]?\s*", fullmatch=True),
    st.sampled_from(["inf", "nan", "-inf", "1e15", "1e999", "2G", "0", "-1", "1e-9", "٣G"]),
)
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                      st.binary(max_size=4), st.lists(st.integers(), max_size=2), st.just(10**5000),
                      st.sampled_from([float("inf"), float("nan"), -0.0, 2**63, "8", 2.5]))


@FAST
@given(SIZES)
def test_sizes_parse_to_positive_bytes_or_one_error_line(text):
    try:
        value = validate.parse_size(text)
    except RkscError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(value, int) and 1 <= value <= validate.MAX_SIZE


@FAST
@given(ANY_VALUE, ANY_VALUE, ANY_VALUE)
def test_argument_checks_accept_or_raise_rksc_error_only(a, b, c):
    for check in (lambda: validate.integer("x", a, b if isinstance(b, int) else None),
                  lambda: validate.number("x", a, minimum=0),
                  lambda: validate.number("x", a, above=0, maximum=1),
                  lambda: validate.choice("x", a, ("p", "q")),
                  lambda: validate.boolean("x", a),
                  lambda: validate.text("x", a),
                  lambda: validate.gold(a),
                  lambda: validate.kv_budget(a),
                  lambda: pool_args(a, b, c),
                  lambda: solver_args(a, b, c)):
        with contextlib.suppress(RkscError):
            check()


SOLVE_FIELDS = ["branches", "max_new_tokens", "select", "temperature", "top_p", "seed", "hints", "verify",
                "cache", "answer_format", "depth", "keep", "verifier"]
BENCH_FIELDS = ["model", "dtype", "dataset", "offset", "limit", "conditions", "regime", "prefix_tokens",
                "max_new_tokens", "branches", "select", "warmup", "resamples", "out", "plots", "warm_index"]


@FAST
@given(st.dictionaries(st.sampled_from(SOLVE_FIELDS), ANY_VALUE, max_size=3),
       st.dictionaries(st.sampled_from(BENCH_FIELDS), ANY_VALUE, max_size=3))
def test_configs_are_built_or_refused_with_rksc_error(solve_fields, bench_fields):
    with contextlib.suppress(RkscError):
        SolveConfig(**solve_fields)
    with contextlib.suppress(RkscError):
        BenchConfig(**bench_fields)


# the command line, up to the point where a model would load -------------------------------------

class Reached(Exception):
    """Every check passed and the command went on to the slow part (stubbed out here)."""


def _reached(*args, **kwargs):
    raise Reached


SOLVE_FLAGS = ["--branches", "-b", "--max-new-tokens", "-n", "--temperature", "--top-p", "--seed", "--kv-budget",
               "--block-size", "--threads", "--evict", "--depth", "--keep", "--select", "--cache", "--verifier",
               "--answer-format", "--dtype", "--model", "--out", "--file"]
BENCH_FLAGS = ["--conditions", "--prefix-tokens", "--limit", "--offset", "-b", "--out", "--dataset", "--regime",
               "--warmup", "-n", "--model", "--dtype", "--select"]
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "8", "inf", "nan", "1e15", "1e999", "2G", "-5", "", " ", "1.5", "True",
                     "9" * 400, "smollm2-135m", "pool", "lru", "naive,rksc", ",", "\udcff", "/nonexistent/x",
                     ".", "-", "tests/data/gsm8k_test_sample.jsonl"]),
    st.text(alphabet=string.printable, max_size=12),
)
PAIRS = st.lists(st.tuples(st.sampled_from(SOLVE_FLAGS), VALUES), max_size=4)
ARGVS = st.one_of(
    st.tuples(st.just(["solve"]), st.lists(st.one_of(ANY_TEXT, VALUES), max_size=1), PAIRS,
              st.lists(st.sampled_from(["--json", "--no-verify", "--no-hints"]), max_size=2))
    .map(lambda t: t[0] + t[1] + [x for pair in t[2] for x in pair] + t[3]),
    st.lists(st.tuples(st.sampled_from(BENCH_FLAGS), VALUES), max_size=4)
    .map(lambda pairs: ["bench"] + [x for pair in pairs for x in pair]),
    st.tuples(st.sampled_from(["list", "pull", "verify", "frob"]), st.lists(VALUES, max_size=2))
    .map(lambda t: ["models", t[0], *t[1]]),
    st.lists(st.one_of(VALUES, st.sampled_from(["solve", "bench", "models", "--json"])), max_size=5),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARGVS)
@example(["solve", "What is 2+3?", "--kv-budget", "inf"])
@example(["solve", "What is \udcff?"])
@example(["bench", "--conditions", ""])
@example(["solve", "--file", "tests/data/gsm8k_test_sample.jsonl", "--out", "tests/data/gsm8k_test_sample.jsonl"])
def test_cli_exits_0_or_2_with_one_line_before_any_model_loads(argv):
    from rksc.bench import harness
    from rksc.models import pull
    from rksc.reasoning.solver import Solver

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(Solver, "load", _reached)
        mp.setattr(harness, "run_bench", _reached)
        mp.setattr(pull, "prepare", _reached)
        mp.setattr(pull, "verify", _reached)
        try:
            code = main(argv)
        except Reached:
            event("checks passed: reached the model load")
            return
        except SystemExit as e:  # --help and friends
            code = e.code
    event(f"exit {code}")
    assert code in (0, 2), (argv, code)
    if code == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rksc: error: "), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
