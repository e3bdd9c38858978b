"""Progress lines for long operations (model load, conversion), written to stderr."""
from __future__ import annotations

import sys
import time
from typing import Callable

# a progress callback: (stage, done, total); total 0 means unknown
ProgressFn = Callable[[str, int, int], None]


class StderrProgress:
    """Prints one line per stage, rewritten in place on a terminal, at most ~10 times a second."""

    def __init__(self, prefix: str = "pie"):
        self.prefix = prefix
        self._last = 0.0
        self._stage = ""
        self._tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total and done >= total
        if stage == self._stage and not finished and now - self._last < (0.1 if self._tty else 2.0):
            return
        self._last, self._stage = now, stage
        count = f" {done}/{total}" if total else ""
        end = "\n" if finished or not self._tty else ""
        sys.stderr.write(f"\r[{self.prefix}] {stage}{count}" + end)
        sys.stderr.flush()


def no_progress(stage: str, done: int, total: int) -> None:
    return None
