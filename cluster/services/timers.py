"""One timer thread per host: delayed callbacks for sleeps and for the timeouts of waiting imports.

`Timers.call_later(seconds, fn)` runs fn on the timer thread once the delay has passed. fn must be
quick (complete a Pending, pop a waiter): every timer of the host shares this one thread. An
exception raised by fn is logged with its traceback and never stops the thread.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from typing import Callable

from cluster.pending import Pending

log = logging.getLogger("pie.timers")

# Rebuild the heap once this many cancelled entries sit in it and they are over half of it, so
# long timeouts that are cancelled early (a message arrived) do not pile up until their deadline.
_COMPACT_MIN_CANCELLED = 64


class TimerHandle:
    """A scheduled call; `cancel()` stops it if it has not started yet."""

    __slots__ = ("_timers", "_fn", "deadline", "_state")

    def __init__(self, timers: "Timers", fn: Callable[[], None], deadline: float):
        self._timers = timers
        self._fn = fn
        self.deadline = deadline  # time.monotonic() seconds at which fn is due
        self._state = "scheduled"  # -> "cancelled" or "fired"; changed under the Timers lock

    @property
    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def cancel(self) -> bool:
        """Stop the call; True if it was still scheduled, False if it already ran or was cancelled."""
        return self._timers._cancel(self)


class Timers:
    """A heap of deadlines served by one daemon thread, started at construction."""

    def __init__(self, name: str = "pie-timers"):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()  # tie-breaker: equal deadlines fire in scheduling order
        self._num_cancelled = 0  # cancelled handles still in the heap
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, seconds: float, fn: Callable[[], None]) -> TimerHandle:
        """Run fn on the timer thread after `seconds` (>= 0, finite); returns its handle."""
        if not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
            raise ValueError(f"a delay must be a finite number of seconds >= 0, got {seconds!r}")
        handle = TimerHandle(self, fn, time.monotonic() + seconds)
        with self._cond:
            if self._closed:
                raise RuntimeError("the timer thread is closed: the host is shutting down")
            heapq.heappush(self._heap, (handle.deadline, next(self._seq), handle))
            if self._heap[0][2] is handle:  # a new earliest deadline: the thread sleeps too long
                self._cond.notify()
        return handle

    def close(self) -> None:
        """Stop the thread; calls still scheduled never run. Idempotent."""
        with self._cond:
            self._closed = True
            for _, _, handle in self._heap:
                handle._state = "cancelled"
            self._heap.clear()
            self._num_cancelled = 0
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Timers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        """Calls still scheduled (cancelled ones excluded)."""
        with self._cond:
            return len(self._heap) - self._num_cancelled

    def _cancel(self, handle: TimerHandle) -> bool:
        with self._cond:
            if handle._state != "scheduled":
                return False
            handle._state = "cancelled"
            self._num_cancelled += 1
            if self._num_cancelled >= _COMPACT_MIN_CANCELLED and 2 * self._num_cancelled > len(self._heap):
                self._heap = [entry for entry in self._heap if entry[2]._state == "scheduled"]
                heapq.heapify(self._heap)
                self._num_cancelled = 0
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                handle = self._next_due()
                if handle is None:
                    return
            try:
                handle._fn()
            except Exception:
                log.exception("timer callback %r failed", handle._fn)
            handle._fn = None  # drop what the callback holds (a Pending, a waiter)

    def _next_due(self) -> TimerHandle | None:
        """Wait (holding the condition) for the earliest scheduled handle to be due; None once closed."""
        while not self._closed:
            if not self._heap:
                self._cond.wait()
                continue
            deadline, _, handle = self._heap[0]
            if handle._state == "cancelled":
                heapq.heappop(self._heap)
                self._num_cancelled -= 1
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                self._cond.wait(min(delay, threading.TIMEOUT_MAX))  # a far deadline: wake, look again
                continue
            heapq.heappop(self._heap)
            handle._state = "fired"
            return handle
        return None


def sleep(timers: Timers, seconds: float) -> Pending:
    """A Pending completed with None once `seconds` have passed."""
    pending = Pending()
    timers.call_later(seconds, pending.complete)
    return pending
