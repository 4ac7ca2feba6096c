"""The --out file of a batch (`rksc solve --file F --out O`), resumable.

One JSON record per input line, each carrying its input line number ("line"). A rerun with the
same --out keeps every result already there and solves only the other lines; the new records are
appended (flushed one by one, so an interrupted run loses nothing it wrote) and, once the run
ends, the file holds every line exactly once in input order. Error records are recomputed, and a
last line cut short by a crash is dropped. A file whose results belong to other problems, another
model or other settings is refused rather than mixed: give another --out or delete it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from rksc.errors import RkscError


class ResultsFile:
    def __init__(self, path: str, problems: list[tuple[int, dict | None, str | None]], config, model: str):
        """Read what `path` already holds for these problems (nothing is written yet); `config` is
        the run's SolveConfig and `model` the name its results carry."""
        self.path = Path(path)
        self.done: dict[int, bool | None] = {}  # input line -> "correct" of the result already there
        self._kept: dict[int, str] = {}  # input line -> its record, as written
        self._clean = True  # the file holds exactly the kept records, in input order
        self._last_kept = 0
        self._out = None
        if self.path.is_file():
            questions = {n: item["question"] for n, item, _ in problems if item is not None}
            settings = json.loads(json.dumps(asdict(config)))  # as a record stores them (tuples -> lists)
            self._read(questions, settings, model)

    def _read(self, questions: dict[int, str], settings: dict, model: str) -> None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise RkscError(f"cannot read --out {self.path}: {e.strerror or e}") from None
        self._clean = text.endswith("\n") or not text  # else the next record would run on from the last
        lines = text.split("\n")
        lines = [(k, line) for k, line in enumerate(lines, start=1) if line.strip()]
        previous = 0
        for position, (k, line) in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("line"), int):
                if position == len(lines):  # cut short by an interrupted run: solved again
                    self._clean = False
                    continue
                raise RkscError(f"--out {self.path} is not an rksc results file (line {k} is no result record); "
                                f"give another --out or delete it")
            n = record["line"]
            self._clean &= n > previous and "error" not in record
            previous = n
            if "error" in record:
                continue  # bad input or a failed solve: tried again
            self._check(record, questions, settings, model)
            self.done[n], self._kept[n] = record.get("correct"), line

    def _check(self, record: dict, questions: dict[int, str], settings: dict, model: str) -> None:
        n, fix = record["line"], "give another --out or delete it"
        if questions.get(n) != record.get("question"):
            raise RkscError(f"--out {self.path} holds a result for another problem at line {n} of the input; {fix}")
        if record.get("model") != model:
            raise RkscError(f"--out {self.path} holds results of model {record.get('model')}, not {model}; {fix}")
        theirs = record.get("config") or {}
        differ = [f"{k} {theirs.get(k)!r} there, {v!r} now" for k, v in settings.items() if theirs.get(k) != v]
        if differ:
            raise RkscError(f"--out {self.path} holds results of other settings ({'; '.join(differ[:3])}); {fix}")

    def open(self) -> ResultsFile:
        """Start writing: a file holding anything but the kept records in order is rewritten first."""
        if not self._clean:
            self._rewrite(self._kept)
        self._last_kept = max(self._kept, default=0)
        self._appended_after = False  # a new record went after a later kept one: sort at the end
        self._out = open(self.path, "a" if self._kept else "w", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self._appended_after |= record["line"] < self._last_kept
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()

    def close(self) -> None:
        """Close; a run that filled gaps between kept records leaves the file in input order."""
        if self._out is None:
            return
        self._out.close()
        self._out = None
        if self._appended_after:
            lines = [line for line in self.path.read_text(encoding="utf-8").split("\n") if line.strip()]
            self._rewrite({json.loads(line)["line"]: line for line in lines})

    def _rewrite(self, records: dict[int, str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(records[n] + "\n" for n in sorted(records))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one
