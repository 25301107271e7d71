"""The `fuser` logger, switched on the way Dynamo's and Inductor's are:

    TORCH_LOGS="fuser" python train.py                        # each rewrite and near miss, one line each
    TORCH_LOGS="+fuser"                                       # ... and debug detail
    torch._logging.set_logs(modules={"fuser": logging.INFO})  # the same from Python

Every module logs under "fuser." (`logging.getLogger(__name__)`), so the one registered name covers them;
off (WARNING) unless asked for.

Progress of the steps that can take seconds (compiling a graph, tuning a kernel, fuzzing) goes to one logger,
`fuser.progress`, at INFO: `progress(...)` for a step of a count, `step(...)` for one that runs a while. Its
handler draws them on stderr, on a terminal only, each over the last (with a bar where the count is known);
elsewhere (a file, a pipe, CI) nothing. Quiet on a terminal too with
`logging.getLogger("fuser.progress").setLevel(logging.WARNING)` (or any handlers and level of your own: fuser sets
its defaults only where the logger has none). The command line shows it everywhere (`showing_progress`).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Iterator, TextIO

import torch._logging._internal as torch_logging

NAME = "fuser"
torch_logging.register_log(NAME, NAME)

PROGRESS = logging.getLogger("fuser.progress")
_BAR = 20  # characters


class ProgressHandler(logging.StreamHandler):
    """Progress records on a stream (sys.stderr as it is at each record, when none is given): on a terminal each
    over the last (a warning stays), with a bar where the record carries its count; elsewhere one a line, or
    nothing with `terminal_only`."""

    def __init__(self, stream: TextIO | None = None, terminal_only: bool = False):
        super().__init__(stream or sys.stderr)
        self.follows_stderr, self.terminal_only = stream is None, terminal_only

    def emit(self, record: logging.LogRecord) -> None:
        if self.follows_stderr:
            self.stream = sys.stderr  # not setStream: it flushes the last one, which may be closed
        live = _is_terminal(self.stream)
        if self.terminal_only and not live:
            return
        self.terminator = "\n"
        if live:
            leave = getattr(record, "leave", None)
            done, total = getattr(record, "progress", (None, None))
            bar = f" [{'#' * (_BAR * min(done, total) // total):.<{_BAR}}]" if total else ""
            self.terminator = bar + ("\n" if leave or record.levelno >= logging.WARNING else "")
            try:
                self.stream.write("\r\033[K")  # over the last record
                if leave is False:  # the step is done: its line goes
                    return self.flush()
            except Exception:  # progress never breaks what it reports on
                return self.handleError(record)
        super().emit(record)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or no file
        return False


def progress(message: str, *args, done: int | None = None, total: int | None = None,
             leave: bool | None = None) -> None:
    """One progress record (`message % args`): `done` of `total` where they are known; the last of a step says
    whether its line stays on a terminal (`leave`) or goes."""
    if PROGRESS.isEnabledFor(logging.INFO):
        PROGRESS.info(message, *args, extra={"progress": (done, total), "leave": leave})


def shows_live() -> bool:
    """Whether a progress record would be drawn on a terminal now (what a ticking clock is worth running for)."""
    if not PROGRESS.isEnabledFor(logging.INFO):
        return False
    return any(_is_terminal(sys.stderr if getattr(h, "follows_stderr", False) else getattr(h, "stream", None))
               for h in PROGRESS.handlers)


@contextlib.contextmanager
def step(what: str, leave: bool = False) -> Iterator[None]:
    """`what ...` when it starts, the seconds ticking meanwhile on a terminal, `what: 1.2 s` when it is done (a line
    that stays on a terminal with `leave`)."""
    start, done = time.perf_counter(), threading.Event()

    def tick() -> None:
        while not done.wait(1):
            progress("%s ... %.0f s", what, time.perf_counter() - start)

    progress("%s ...", what)
    ticker = threading.Thread(target=tick, daemon=True) if shows_live() else None
    if ticker is not None:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
        progress("%s: %.1f s", what, time.perf_counter() - start, leave=leave)


@contextlib.contextmanager
def showing_progress(stream: TextIO) -> Iterator[None]:
    """Progress on `stream` on and off a terminal (the command line's, whose user asked for the step's output)."""
    handlers, level = PROGRESS.handlers[:], PROGRESS.level
    PROGRESS.handlers[:] = [ProgressHandler(stream)]
    PROGRESS.setLevel(logging.INFO)
    try:
        yield
    finally:
        PROGRESS.handlers[:] = handlers
        PROGRESS.setLevel(level)


if not PROGRESS.handlers and PROGRESS.level == logging.NOTSET:  # the user's own logging set first wins
    PROGRESS.addHandler(ProgressHandler(terminal_only=True))
    PROGRESS.setLevel(logging.INFO)
PROGRESS.propagate = False  # not again through torch's "fuser" handler when TORCH_LOGS="fuser"
