"""The one validation layer: every entry point (SolveConfig, Solver, Solver.load, BenchConfig) turns
a bad argument into one clear RkscError line, never an internal exception or a silent acceptance."""

import time

import pytest

from rksc import validate
from rksc.bench.harness import BenchConfig
from rksc.errors import RkscError
from rksc.reasoning.solver import SolveConfig, Solver


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 0}, "block-size must be at least 1"),  # was AssertionError, after loading
    ({"evict": "bogus"}, "evict must be one of"),  # was KeyError
    ({"threads": -1}, "threads must be at least 1"),  # was RuntimeError from torch
    ({"threads": 0}, "threads must be at least 1"),  # was silently ignored
    ({"threads": 2.5}, "threads must be an integer"),
    ({"kv_budget": float("inf")}, "kv-budget must be an integer"),
    ({"kv_budget": 10**15}, "more than this machine's memory"),
    ({"kv_budget": 0}, "kv-budget must be at least 1"),
    ({"dtype": "int3"}, "unknown dtype 'int3'"),
    ({"weights": "int3"}, "unknown weight format 'int3'"),
])
def test_solver_load_checks_its_arguments_before_loading(kwargs, message):
    t = time.perf_counter()
    with pytest.raises(RkscError, match=message):
        Solver.load("smollm2-135m", **kwargs)
    assert time.perf_counter() - t < 2  # no model was loaded


def test_solver_load_rejects_a_model_that_is_not_text():
    with pytest.raises(RkscError, match="model must be a string"):
        Solver.load(123)


@pytest.mark.parametrize("kwargs,message", [
    ({"branches": "8"}, "branches must be an integer"),  # was TypeError
    ({"branches": 2.5}, "branches must be an integer"),  # was accepted
    ({"branches": True}, "branches must be an integer"),  # was accepted as 1
    ({"branches": 0}, "branches must be at least 1"),
    ({"branches": 10**9}, "branches must be at most"),
    ({"max_new_tokens": None}, "max-new-tokens must be an integer"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),  # JSON output held Infinity
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": 10**400}, "temperature is too large"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": "1"}, "top-p must be a number"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"seed": 2**70}, "seed must be at most"),
    ({"hints": "no"}, "hints must be True or False"),
    ({"select": ["vote"]}, "select must be one of"),
    ({"cache": "disk"}, "cache must be one of pool, shared, none"),
    ({"depth": 0}, "depth must be at least 1"),
    ({"keep": 1.0}, "keep must be an integer"),
])
def test_solve_config_rejects_bad_fields_with_one_clear_line(kwargs, message):
    with pytest.raises(RkscError, match=message) as err:
        SolveConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_solve_config_accepts_ordinary_values():
    c = SolveConfig(branches=4, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3, depth=2, keep=1)
    assert c.branches == 4 and c.sampling.temperature == 0.7


@pytest.mark.parametrize("kwargs,message", [
    ({"conditions": ()}, "no conditions given; choose from"),  # said "conditions must be distinct"
    ({"conditions": "rksc"}, "conditions must be a tuple"),
    ({"prefix_tokens": -5}, "prefix-tokens must be at least 0"),  # was accepted
    ({"prefix_tokens": 10**9}, "prefix-tokens must be at most"),
    ({"limit": 0}, "limit must be at least 1"),
    ({"branches": "8"}, "branches must be an integer"),
    ({"regime": ["paper"]}, "regime must be a string"),
    ({"conditions": ("naive", "naive")}, "conditions must be distinct"),
])
def test_bench_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(RkscError, match=message):
        BenchConfig(**kwargs)


@pytest.mark.parametrize("value,expected", [
    ("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("2gb", 2 << 30), ("1e9", 10**9),
    (" 4096 ", 4096), ("1T", 1 << 40),
])
def test_parse_size(value, expected):
    assert validate.parse_size(value) == expected


@pytest.mark.parametrize("value", ["inf", "nan", "1e999", "-1G", "0", "0.1", "lots", "", "G", "1e99999", "2X"])
def test_parse_size_rejects(value):
    with pytest.raises(RkscError):
        validate.parse_size(value)


def test_question_text_checks():
    with pytest.raises(RkscError, match="the question must be a string"):
        validate.question(123)
    with pytest.raises(RkscError, match="the question is empty"):
        validate.question("  \n")
    with pytest.raises(RkscError, match="lone surrogate U\\+D800"):
        validate.question("What is \ud800?")
    with pytest.raises(RkscError, match="not valid UTF-8 \\(byte 0xff"):
        validate.question("What is \udcff?")  # how Python passes undecodable argv bytes


@pytest.mark.slow
def test_solve_rejects_a_non_string_and_a_huge_question_at_once(smollm2):
    solver = Solver(smollm2, kv_budget=64 << 20)
    with pytest.raises(RkscError, match="question must be a string"):
        solver.solve(123)  # was AttributeError
    with pytest.raises(RkscError, match="gold must be a string"):
        solver.solve("What is 2+3?", gold=[5])
    t = time.perf_counter()
    with pytest.raises(RkscError, match="question too long: 50,000,000 characters.*context of 8192"):
        solver.solve("7" * 50_000_000)  # was tokenised in full first (58 s, 5 GB)
    assert time.perf_counter() - t < 5
