"""An Outbox whose reader can be replaced: a client that lost its stream attaches again and
resumes where it left off.

Items are numbered as they are read (`first_seq` on; the Launch stream's `started` is 0). The last
items read stay in a replay history, bounded in count and bytes, so a new reader can ask for any
seq from the oldest kept on. One reader at a time: `attach` hands out a new reader number, and the
reader it replaced gets `Detached` from its next `next()`. The bounds of the Outbox (what may wait
unread before the inferlet's send waits) are unchanged: a stream with no reader holds its inferlet
at those bounds, so a lost client costs the host at most the outbox plus the history.
"""
from __future__ import annotations

import collections

from cluster.errors import InferletError
from cluster.runtime.outbox import Outbox

REPLAY_MESSAGES = 1024  # events kept after they were read, for a re-attaching client
REPLAY_BYTES = 1 << 20


class Detached(Exception):
    """Another reader attached: this one's stream is over."""


class ReplayGone(InferletError):
    """An attach from a seq the history no longer holds, or past what was sent."""


class NotInstanceOwner(InferletError):
    """An attach without the owner token its Launch gave."""


class ReplayOutbox(Outbox):
    def __init__(self, max_messages: int, max_bytes: int, replay_messages: int = REPLAY_MESSAGES,
                 replay_bytes: int = REPLAY_BYTES, first_seq: int = 1):
        super().__init__(max_messages, max_bytes)
        self.replay_messages, self.replay_bytes = replay_messages, replay_bytes
        self._next_seq = first_seq  # of the next item taken from the outbox
        self._history: collections.deque = collections.deque()  # (seq, item, size) read, oldest first
        self._history_bytes = 0
        self._replay: collections.deque = collections.deque()  # (seq, item) to give the current reader first
        self._reader = 0  # the current reader's number

    @property
    def reader(self) -> int:
        with self._cond:
            return self._reader

    def attach(self, from_seq: int) -> int:
        """A new reader that gets the items from `from_seq` on; the old reader is detached. Raises
        ReplayGone when `from_seq` is older than the history or newer than the next item."""
        with self._cond:
            oldest = self._history[0][0] if self._history else self._next_seq
            if not oldest <= from_seq <= self._next_seq:
                raise ReplayGone(
                    f"events from {from_seq} are not held: the server keeps events {oldest} to "
                    f"{self._next_seq - 1} (the last {self.replay_messages} events or {self.replay_bytes} bytes "
                    f"sent); attach from {oldest} to get what remains"
                    if from_seq < oldest else
                    f"event {from_seq} was never sent: the stream has reached {self._next_seq - 1}; attach from "
                    f"the last seq you received plus one")
            self._reader += 1
            self._replay = collections.deque((seq, item) for seq, item, _ in self._history if seq >= from_seq)
            self._cond.notify_all()  # the old reader wakes and sees it is detached
            return self._reader

    def next(self, reader: int, timeout: float | None = None) -> tuple[int, object]:
        """(seq, item): the next item for `reader`. Raises Detached once another reader attached,
        TimeoutError after `timeout` seconds without an item."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._reader != reader or self._replay or self._items, timeout):
                raise TimeoutError("no message within the timeout")
            if self._reader != reader:
                raise Detached()
            if self._replay:
                return self._replay.popleft()
            item, admitted = self._take()
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            self._keep(seq, item)
        for waiting in admitted:  # outside the lock: completing wakes the inferlet
            waiting.complete(None)
        return seq, item

    def get(self, timeout: float | None = None):
        return self.next(self.reader, timeout)[1]

    def _keep(self, seq: int, item) -> None:
        size = len(item.encode("utf-8", "surrogatepass")) if isinstance(item, str) else 0
        self._history.append((seq, item, size))
        self._history_bytes += size
        while len(self._history) > 1 and (len(self._history) > self.replay_messages
                                          or self._history_bytes > self.replay_bytes):
            _, _, dropped = self._history.popleft()
            self._history_bytes -= dropped
