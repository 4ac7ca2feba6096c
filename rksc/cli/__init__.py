"""Command line: `rksc solve`, `rksc serve`, `rksc models list|pull|verify`, `rksc bench`,
`rksc calibrate`, `rksc asks-curve`, `rksc asks-calibrate`, `rksc info`.

User mistakes exit with code 2 and one line on stderr; nothing prints a traceback for them.
Exit codes: 0 done, 2 a user error or bad lines reported in a batch, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from rksc.cli.parser import build_parser
from rksc.cluster.ray import disconnect
from rksc.errors import RkscError

__all__ = ["build_parser", "main"]

# a command's module loads only when it runs, so `rksc --help` and a Ctrl-C during start-up
# need no torch
COMMANDS = {"solve": "rksc.cli.solve", "models": "rksc.cli.models", "bench": "rksc.cli.bench",
            "calibrate": "rksc.cli.calibrate", "serve": "rksc.cli.serve",
            "asks-curve": "rksc.cli.asks_curve", "asks-calibrate": "rksc.cli.asks_calibrate",
            "info": "rksc.cli.info"}
LONG = ("solve", "bench", "calibrate", "asks-curve", "asks-calibrate")  # Ctrl-C ends these at once


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if argv is None and args.command in LONG:
            _exit_on_interrupt()
        code = importlib.import_module(COMMANDS[args.command]).run(args)
        sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
        return code
    except RkscError as e:
        print(f"rksc: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if argv is None:  # the command line: end now. Interpreter shutdown can meet the interrupt
            # again (threads of the model load, atexit hooks) and die of SIGINT instead of exiting
            # with 130; every file was closed while the exception unwound, so nothing is lost.
            _end_interrupted()
        print("rksc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rksc ... | head`: the reader has what it wanted; end quietly
        _stdout_to_devnull()
        return 0
    except SystemExit as e:  # rich handles a broken pipe itself with exit 1: same quiet end
        if isinstance(e.__context__, BrokenPipeError):
            return 0
        raise


def _exit_on_interrupt() -> None:
    """Ctrl-C ends the LONG commands at once with the one line and 130. Raised as a
    KeyboardInterrupt it could land inside transformers' lazy imports or the model load, which
    turn it into other errors or swallow it. Every output line is written whole and flushed
    (a resumed calibration or bench skips a cut line), so ending here loses no finished result."""
    signal.signal(signal.SIGINT, lambda signum, frame: _end_interrupted())


def _end_interrupted() -> None:
    """Flush what was written, say "rksc: interrupted", leave a Ray cluster (--ray: the exit skips
    Ray's own clean-up) and end the process with 130 at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    print("rksc: interrupted", file=sys.stderr, flush=True)
    disconnect()
    os._exit(130)


def _one_line(text: str) -> str:
    """Messages quote user input; escape what would break the line or the terminal (\\r, \\n)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so Python's final flush of the unread rest does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. in tests)
        pass
