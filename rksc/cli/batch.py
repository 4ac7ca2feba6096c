"""A batch file (`rksc solve --file F [--out O]`): its lines read, a resumed --out, and the loop
that solves the lines and writes one record per line in input order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from rksc import validate
from rksc.cli.common import open_solver, quiet_transformers
from rksc.cluster.ray import Workers
from rksc.errors import RkscError
from rksc.models.loader import display_name
from rksc.models.registry import DEFAULT_MODEL
from rksc.reasoning.answers import gsm8k_gold
from rksc.reasoning.solver import default_concurrency
from rksc.results import ResultsFile

Line = tuple[int, dict | None, str | None]  # (line number, problem or None, error or None)


def read_problems(path: str) -> list[Line]:
    """A row for every non-blank line. A line that cannot be used (not UTF-8, not JSON, too
    deeply nested, no question) carries its error and the rest still run; only a file that
    cannot be read at all, or holds no lines, is an error here."""
    validate.text("--file", path)
    file = Path(path)
    try:
        if not file.is_file():
            raise RkscError(f"file not found: {path}" if not file.exists()
                            else f"--file {path} is not a file")
        data = file.read_bytes()
    except OSError as e:
        raise RkscError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        parsed = parse_problem_line(raw)
        if parsed is not None:
            rows.append((n, *parsed))
    if not rows:
        raise RkscError(f"{path} holds no problems")
    return rows


def parse_problem_line(raw: bytes) -> tuple[dict | None, str | None] | None:
    """One JSONL line -> (problem, None) or (None, why it is unusable); None for a blank line."""
    raw = raw.removesuffix(b"\r")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "not valid JSON here (nested too deeply)"
    except ValueError as e:  # e.g. an integer longer than Python converts (4300 digits)
        return None, f"not valid JSON here ({str(e).split(';')[0][:120]})"
    question = item.get("question") if isinstance(item, dict) else None
    if not isinstance(question, str) or not question.strip():
        return None, 'expected an object with a non-empty "question" string'
    try:
        validate.text("question", question)
    except RkscError as e:
        return None, str(e)
    return item, None


def gold(item: dict) -> str | None:
    answer = item.get("answer", item.get("gold"))
    if answer is None:
        return None
    answer = str(answer)
    if "####" in answer:  # a full GSM8K solution: the answer follows '####'
        return gsm8k_gold(answer) or answer
    return answer


def results_file(args, problems: list[Line], config) -> ResultsFile | None:
    """The --out file, with the results an earlier run left there (checked, not yet written)."""
    if not args.out:
        return None
    validate.output_file(args.out, "--out", input_path=args.file)
    return ResultsFile(args.out, problems, config, display_name(args.model or DEFAULT_MODEL))


def solve_file(solver_kwargs: dict, config, problems: list[Line], args,
               results: ResultsFile | None) -> int:
    """Solve the lines of a --file (those not already in a resumed --out) and write one record per
    line in input order; on one engine here, or on Ray workers with --ray."""
    earlier = results.done if results is not None else {}
    todo = [row for row in problems if row[0] not in earlier]
    if earlier:
        print(f"rksc: {args.out} already holds results for {len(earlier)} of {len(problems)} "
              f"lines; solving the other {len(todo)}", file=sys.stderr)
    good = [(n, item) for n, item, error in todo if item is not None]
    items = [{"question": item["question"], "gold": gold(item)} for _, item in good]
    concurrency = args.concurrency or default_concurrency(config)
    source = _engine(solver_kwargs, args) if items else None  # nothing to solve: no model to load
    if source is None:
        pending = iter(())
    elif config.cache == "pool":
        pending = source.solve_many(items, config, concurrency)
    else:  # the baselines solve one problem at a time
        pending = enumerate(_solve_or_error(source, item, config) for item in items)
    write = results.open().write if results is not None else _print_record
    bad = 0
    scored = sum(c is not None for c in earlier.values())
    correct = sum(bool(c) for c in earlier.values())
    bar = tqdm(total=len(problems), initial=len(earlier), desc="solve", unit="problem",
               file=sys.stderr)
    try:
        for n, item, error in todo:  # input order: each line waits for the problems before it
            if item is not None:
                _, result = next(pending)
                if isinstance(result, RkscError):
                    error = str(result)
                else:
                    record = {"line": n, "id": item.get("id"), **result.to_dict()}
                    scored += result.correct is not None
                    correct += bool(result.correct)
            if error is not None:
                bad += 1
                tqdm.write(f"rksc: {args.file}:{n}: {error}", file=sys.stderr)
                record = {"line": n, "error": error}
            write(record)
            bar.update()
        pooled = source is not None and config.cache == "pool"
        hit, queried = source.prefix_stats() if pooled else (0, 0)
    finally:
        bar.close()
        if results is not None:
            results.close()
        if args.ray is not None and source is not None:
            source.close()
    summary = f"solved {len(problems) - bad} of {len(problems)} problems"
    if earlier:
        summary += f" ({len(earlier)} in an earlier run)"
    if config.cache == "pool" and items:
        if args.ray is not None:
            in_flight = source.in_flight(concurrency, len(items))
            summary += f" ({source.describe()}, {in_flight} in flight each)"
        else:
            summary += f" ({min(concurrency, len(items))} in flight)"
    if queried:
        summary += (f"; prefix index reused {hit} of {queried} prompt tokens "
                    f"({hit / queried:.0%})")
    if scored:
        summary += f"; accuracy {correct}/{scored} = {correct / scored:.1%}"
    if bad:
        summary += f"; {bad} bad line(s) reported above"
    print(summary + (f"; results in {args.out}" if args.out else ""), file=sys.stderr)
    return 2 if bad else 0


def _engine(solver_kwargs: dict, args):
    """A Solver here, or with --ray the Workers of a Ray cluster (both solve_many alike)."""
    if args.ray is not None:
        return Workers.start(args.ray or None, solver_kwargs, args.ray_workers)
    quiet_transformers()
    return open_solver(solver_kwargs)


def _print_record(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _solve_or_error(solver, item: dict, config):
    try:
        return solver.solve(item["question"], config, gold=item["gold"])
    except RkscError as e:
        return e
