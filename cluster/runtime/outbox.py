"""An inferlet's messages on their way to its client, bounded in count and bytes.

put() answers a Pending: done at once while there is room, else once the reader has taken
enough. The inferlet's `send` waits on it, so an inferlet whose client reads slowly is
suspended (others run) instead of growing the server; one whose client reads nothing waits
until its wall-clock limit ends it. The end of the stream (an Outcome) always fits."""
from __future__ import annotations

import collections
import threading
from typing import Callable

from cluster.pending import Pending


class Outbox:
    def __init__(self, max_messages: int, max_bytes: int, on_item: Callable[[], None] | None = None):
        """`on_item`: called (under the box's lock: it must not block) when an item becomes
        readable, for a reader that waits elsewhere than in get() (an event loop)."""
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._on_item = on_item
        self._items: collections.deque = collections.deque()  # (message, size), then (the end, 0)
        self._bytes = self._count = 0  # of the messages in _items
        self._blocked: collections.deque = collections.deque()  # (message, size, Pending) past the bound
        self._cond = threading.Condition()

    def _fits(self, size: int) -> bool:
        return not self._items or (self._count < self.max_messages and self._bytes + size <= self.max_bytes)

    def put(self, message) -> Pending:
        """A message (str); anything else is the stream's end (see end())."""
        if not isinstance(message, str):
            self.end(message)
            return Pending.ready(None)
        size = len(message.encode("utf-8", "surrogatepass"))
        with self._cond:
            if not self._blocked and self._fits(size):
                self._items.append((message, size))
                self._bytes += size
                self._count += 1
                self._notify()
                return Pending.ready(None)
            waiting = Pending()
            self._blocked.append((message, size, waiting))
            return waiting

    def end(self, item) -> None:
        """The last item (an Outcome), after every message put before it, blocked ones included."""
        with self._cond:
            self._blocked.append((item, 0, None))
            self._admit()

    def _admit(self) -> list[Pending]:
        admitted = []
        while self._blocked and (self._blocked[0][2] is None or self._fits(self._blocked[0][1])):
            item, size, waiting = self._blocked.popleft()
            self._items.append((item, size))
            if waiting is not None:
                self._bytes += size
                self._count += 1
                admitted.append(waiting)
        self._notify()
        return admitted

    def _notify(self) -> None:
        self._cond.notify()
        if self._on_item is not None:
            self._on_item()

    def get(self, timeout: float | None = None):
        """The next item, waiting for one; raises TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no message within the timeout")
            item, admitted = self._take()
        for waiting in admitted:  # outside the lock: completing wakes the inferlet
            waiting.complete(None)
        return item

    def _take(self) -> tuple[object, list[Pending]]:
        """Under the lock, with an item there: the next item, and the blocked sends it made room for
        (complete them outside the lock)."""
        item, size = self._items.popleft()
        if isinstance(item, str):
            self._bytes -= size
            self._count -= 1
        return item, self._admit()

    @property
    def buffered_bytes(self) -> int:
        with self._cond:
            return self._bytes
