"""A result that arrives later: completed once, from any thread, by whoever produces it.

Host imports that may wait (a forward pass, a queue pull, a sleep, an HTTP request) return a
Pending; the scheduler resumes the inferlet once it is done. Producers call `complete` or
`fail` exactly once (later calls are ignored and return False); consumers read `value` /
`error` after `done`, or register `on_done` callbacks, which run on the completing thread.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class Pending:
    __slots__ = ("_lock", "_done", "value", "error", "_callbacks")

    def __init__(self):
        self._lock = threading.Lock()
        self._done = False
        self.value: Any = None
        self.error: Exception | None = None  # set instead of value when the operation failed
        self._callbacks: list[Callable[[Pending], None]] = []

    @classmethod
    def ready(cls, value: Any = None) -> "Pending":
        p = cls()
        p.complete(value)
        return p

    @classmethod
    def failed(cls, error: Exception) -> "Pending":
        p = cls()
        p.fail(error)
        return p

    @property
    def done(self) -> bool:
        return self._done

    def complete(self, value: Any = None) -> bool:
        return self._finish(value, None)

    def fail(self, error: Exception) -> bool:
        return self._finish(None, error)

    def _finish(self, value: Any, error: Exception | None) -> bool:
        with self._lock:
            if self._done:
                return False
            self.value, self.error, self._done = value, error, True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        return True

    def on_done(self, fn: Callable[["Pending"], None]) -> None:
        """Call fn(self) once done: now if it already is, else on the completing thread."""
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def map(self, fn: Callable[[Any], Any]) -> "Pending":
        """A Pending of fn(value) once this completes; fails with this one's error, or with what fn raised."""
        out = Pending()

        def done(p: Pending) -> None:
            if p.error is not None:
                out.fail(p.error)
                return
            try:
                value = fn(p.value)
            except Exception as e:
                out.fail(e)
                return
            out.complete(value)

        self.on_done(done)
        return out

    def then(self, fn: Callable[[Any], "Pending"]) -> "Pending":
        """A Pending of what fn(value) gives once this completes (fn starts the next step and returns its
        Pending); fails with this one's error, or with what fn raised."""
        out = Pending()

        def go(p: Pending) -> None:
            if p.error is not None:
                out.fail(p.error)
                return
            try:
                inner = fn(p.value)
            except Exception as e:
                out.fail(e)
                return
            inner.on_done(lambda r: out.fail(r.error) if r.error is not None else out.complete(r.value))

        self.on_done(go)
        return out

    def wait(self, timeout: float | None = None) -> Any:
        """Block the calling thread until done (for host-side callers and tests); raise its error."""
        if not self._done:
            event = threading.Event()
            self.on_done(lambda _: event.set())
            if not event.wait(timeout):
                raise TimeoutError(f"not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value
