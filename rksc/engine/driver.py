"""The driver: the one loop that runs programs on an engine, for `solve_many` and the server alike.

A program is a generator that adds sequences, yields what it waits for and returns its result:

    def program(engine):
        seq = engine.add(Sequence(ids, max_tokens=32))
        yield [seq]                 # resumes once every listed sequence has finished
        return seq.token_ids

It may also yield `Progress(seqs)`: it resumes after any step in which one of them gained a token
(early exit reads the streams this way and cancels sequences).

`Driver` holds the programs in flight on one engine (anything implementing rksc.engine.api's
`EngineAPI`). Its owner starts programs, calls `resume_ready` and `step` in turn, and takes the
results: `run_programs` for a fixed list, the server's engine loop for programs that arrive
between steps. The owners differ only in where programs come from and where results go.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rksc.engine.api import EngineAPI
from rksc.engine.sequence import Sequence
from rksc.errors import RkscError

Program = Generator[Any, None, Any]


@dataclass
class Progress:
    """Yielded by a program: resume after the next step that gives any of `seqs` a token."""

    seqs: list[Sequence]
    since: int = -1  # the engine step at which it was yielded


class Driver:
    """Programs in flight on one engine, each suspended at its wait (a list of sequences or a
    `Progress`). A program ends with its return value, or with the exception it raised if that is
    one of `errors` (others propagate, after the program's `finally` ran)."""

    def __init__(self, engine: EngineAPI, errors: tuple[type[BaseException], ...] = (RkscError,)):
        self.engine, self.errors = engine, errors
        self.waits: dict[Any, Any] = {}  # key -> what the program waits for
        self._programs: dict[Any, Program] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def start(self, key, program: Program) -> tuple[Any, Any] | None:
        """Run a new program to its first wait; returns (key, result) if it ended at once."""
        assert key not in self._programs, key
        self._programs[key] = program
        return self._advance(key, first=True)

    def ready(self) -> list:
        """Keys of the programs whose wait is over."""
        return [key for key, wait in self.waits.items() if self._over(wait)]

    def resume_ready(self) -> list[tuple[Any, Any]]:
        """Resume every program whose wait is over, until none is; returns (key, result) of those
        that ended."""
        ended = []
        while ready := self.ready():
            ended += [e for key in ready if (e := self._advance(key)) is not None]
        return ended

    def step(self) -> Exception | None:
        """Step the engine once. A step whose forward pass or sampling raised has ended its own
        sequences with the error: with Exception among `errors` the programs waiting on them fail
        (and the error is returned), the others go on; otherwise it propagates."""
        failed = self.engine.stats.failed_steps
        try:
            self.engine.step()
        except Exception as e:
            if Exception not in self.errors or self.engine.stats.failed_steps == failed:
                raise
            return e
        return None

    def stalled(self) -> list:
        """Keys of programs that wait while the engine has no work: no step can end their waits."""
        if self.engine.has_work or self.ready():
            return []
        return list(self.waits)

    def close(self, key) -> None:
        """Abandon a program: GeneratorExit at its wait, so its `finally` cancels its sequences."""
        program = self._programs.pop(key, None)
        self.waits.pop(key, None)
        if program is not None:
            program.close()

    def _over(self, wait) -> bool:
        if isinstance(wait, Progress):
            return any(s.book.last_step > wait.since or s.finished for s in wait.seqs)
        return all(s.finished for s in wait)

    def _advance(self, key, first: bool = False) -> tuple[Any, Any] | None:
        program = self._programs[key]
        self.waits.pop(key, None)
        try:
            wait = next(program) if first else program.send(None)
        except StopIteration as stop:
            del self._programs[key]
            return key, stop.value
        except self.errors as e:
            del self._programs[key]
            return key, e
        except BaseException:
            del self._programs[key]
            raise
        self.waits[key] = wait
        if isinstance(wait, Progress):
            wait.since = self.engine.stats.steps  # only steps after this point count
        return None


def run_programs(engine: EngineAPI, programs: Iterable[Program], concurrency: int = 1,
                 errors: tuple[type[BaseException], ...] = (RkscError,)) -> Iterator[tuple[int, Any]]:
    """Run programs, at most `concurrency` at a time, in the given order; yields (index, result)
    as each completes, where result is the program's return value or the exception it raised if
    that is one of `errors` (others propagate). With Exception among `errors`, a step whose
    forward pass fails fails only the programs waiting on its sequences."""
    assert concurrency >= 1, concurrency
    source = enumerate(programs)
    driver = Driver(engine, errors)
    exhausted = False
    while True:
        moved = True
        while moved:  # start programs and resume every one whose wait is over
            moved = False
            while not exhausted and len(driver) < concurrency:
                try:
                    index, program = next(source)
                except StopIteration:
                    exhausted = True
                    break
                moved = True
                if (ended := driver.start(index, program)) is not None:
                    yield ended
            for ended in driver.resume_ready():
                moved = True
                yield ended
        if not driver and exhausted:
            return
        if driver.stalled():
            raise RuntimeError("programs wait for sequences that the engine does not have")
        driver.step()


def failed(seqs: list[Sequence]) -> None:
    """Raise the error of the first sequence that ended with one."""
    for s in seqs:
        if s.stop_reason == "error":
            raise RkscError(s.out.error)


def last_logits(seqs: list[Sequence]) -> torch.Tensor:
    """Stacked next-token logits after each sequence's prompt ([R, V]); raises for failed ones."""
    failed(seqs)
    return torch.stack([s.out.logits for s in seqs])
