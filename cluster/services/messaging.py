"""Messages between inferlets: broadcast topics, push/pull queues, a key-value store.

One MessageBus is shared by every inferlet of a host in embedded mode, and by every inferlet of the
cluster in cluster mode (served by the bus actor, cluster/rpc/bus_service.py); inferlets are named by
their string id.

- Topics: `subscribe` then `next_broadcast`. A broadcast is copied into the buffer of every
  subscriber except its sender. A buffer is bounded (messages and bytes): when full, the oldest
  message is dropped and counted (`dropped`), so a flooding sender never blocks and never grows
  memory without bound.
- Queues: `push` then `pull`; each message goes to exactly one puller, first in first out. A full
  queue refuses the push (the producer retries later); queues exist while they hold messages or
  waiters.
- Store: small string values under string keys, shared by all inferlets of the host.

Calls that wait (`next_broadcast`, `pull`) return a Pending completed by another inferlet's call or
by a timeout on the shared Timers thread, with None when the wait ends without a message (timeout,
unsubscribe, the inferlet ended). Nothing here blocks its caller. Pendings are completed after the
bus lock is released, so their callbacks may call the bus again.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

from cluster import metrics
from cluster.errors import MessagingError
from cluster.pending import Pending
from cluster.services.timers import TimerHandle, Timers

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class BusLimits:
    max_message_bytes: int = 64 * KiB  # bytes (utf-8) of one message or one store value
    max_name_bytes: int = 256  # bytes (utf-8) of a topic, queue or store key
    max_buffered_messages: int = 256  # messages buffered per subscriber per topic; oldest dropped beyond
    max_buffered_bytes: int = 1 * MiB  # bytes buffered per subscriber per topic; oldest dropped beyond
    max_subscriptions: int = 64  # topics one inferlet may subscribe to at once
    max_waiting_calls: int = 64  # next_broadcast + pull calls one inferlet may have waiting at once
    max_queue_items: int = 1024  # messages held by one queue; push refused beyond
    max_queue_bytes: int = 4 * MiB  # bytes held by one queue; push refused beyond
    max_total_queue_bytes: int = 64 * MiB  # bytes held by all queues of the host together
    max_store_entries: int = 4096  # keys in the store
    max_store_bytes: int = 16 * MiB  # bytes of all keys + values in the store


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate: not text any receiver could decode
        raise MessagingError(f"text is not valid unicode ({e.reason} at index {e.start})") from None


class _Waiter:
    """One waiting next_broadcast or pull: whoever takes it out of `line` (under the lock) completes it."""

    __slots__ = ("inferlet_id", "pending", "line", "queue", "timer")

    def __init__(self, inferlet_id: str, line: deque, queue: str | None):
        self.inferlet_id = inferlet_id
        self.pending = Pending()
        self.line = line  # the deque of waiters it stands in; None once taken out
        self.queue = queue  # the queue it pulls from; None for a next_broadcast
        self.timer: TimerHandle | None = None


@dataclass
class _Subscription:
    buffer: deque = field(default_factory=deque)  # of (message, utf-8 bytes), oldest first
    buffered_bytes: int = 0
    dropped: int = 0  # messages dropped from a full buffer since subscribing
    waiters: deque = field(default_factory=deque)  # of _Waiter; non-empty only while buffer is empty


@dataclass
class _Queue:
    items: deque = field(default_factory=deque)  # of (message, utf-8 bytes), oldest first
    num_bytes: int = 0
    waiters: deque = field(default_factory=deque)  # of _Waiter; non-empty only while items is empty


class MessageBus:
    """Topics, queues and a key-value store shared by the inferlets of one host; thread-safe."""

    def __init__(self, limits: BusLimits, timers: Timers):
        self.limits = limits
        self._timers = timers
        self._lock = threading.Lock()
        self._subscribers: dict[str, dict[str, _Subscription]] = {}  # topic -> inferlet id -> subscription
        self._topics_of: dict[str, set[str]] = {}  # inferlet id -> topics it subscribes to
        self._waiting: dict[str, set[_Waiter]] = {}  # inferlet id -> its waiting calls
        self._queues: dict[str, _Queue] = {}
        self._total_queue_bytes = 0
        self._store: dict[str, str] = {}
        self._store_bytes = 0  # utf-8 bytes of all keys + values

    # ---- topics ----

    def subscribe(self, inferlet_id: str, topic: str) -> bool:
        """Start buffering broadcasts on topic for the inferlet; False if it already subscribes."""
        self._check_name("topic", topic)
        with self._lock:
            topics = self._topics_of.setdefault(inferlet_id, set())
            if topic in topics:
                return False
            if len(topics) >= self.limits.max_subscriptions:
                raise MessagingError(
                    f"inferlet {inferlet_id} already subscribes to {len(topics)} topics "
                    f"(limit {self.limits.max_subscriptions}); unsubscribe from one first")
            topics.add(topic)
            self._subscribers.setdefault(topic, {})[inferlet_id] = _Subscription()
            return True

    def unsubscribe(self, inferlet_id: str, topic: str) -> bool:
        """Stop buffering topic; its buffer is discarded and its waiting calls get None. False if not subscribed."""
        self._check_name("topic", topic)
        with self._lock:
            sub = self._remove_subscription(inferlet_id, topic)
            if sub is None:
                return False
            ended = self._take_all(sub.waiters)
        self._finish(ended, None)
        return True

    def broadcast(self, sender_id: str, topic: str, message: str) -> int:
        """Copy message to every subscriber of topic but the sender; returns how many received it."""
        self._check_name("topic", topic)
        size = self._check_message(message)
        handed: list[_Waiter] = []
        with self._lock:
            subs = self._subscribers.get(topic, {})
            for inferlet_id, sub in subs.items():
                if inferlet_id == sender_id:
                    continue
                if sub.waiters:
                    handed.append(self._take(sub.waiters[0]))
                else:
                    self._buffer(sub, message, size)
            received = len(subs) - (sender_id in subs)
        metrics.BUS_PUBLISHED.inc()
        self._finish(handed, message)
        return received

    def next_broadcast(self, inferlet_id: str, topic: str, timeout_s: float | None) -> Pending:
        """The next message on topic for this subscriber, or None after timeout_s (None: no timeout)."""
        self._check_name("topic", topic)
        self._check_timeout(timeout_s)
        with self._lock:
            sub = self._subscribers.get(topic, {}).get(inferlet_id)
            if sub is None:
                raise MessagingError(
                    f"inferlet {inferlet_id} is not subscribed to topic {topic!r}; subscribe before waiting on it")
            if sub.buffer:
                message, size = sub.buffer.popleft()
                sub.buffered_bytes -= size
                return Pending.ready(message)
            if timeout_s == 0:
                return Pending.ready(None)
            self._check_may_wait(inferlet_id)
            return self._wait(inferlet_id, sub.waiters, timeout_s).pending

    def dropped(self, inferlet_id: str, topic: str) -> int:
        """Messages dropped from this subscriber's full buffer on topic since it subscribed (0 if not subscribed)."""
        with self._lock:
            sub = self._subscribers.get(topic, {}).get(inferlet_id)
            return 0 if sub is None else sub.dropped

    # ---- queues ----

    def push(self, inferlet_id: str, queue: str, message: str) -> None:
        """Append message to queue, or hand it to the longest-waiting puller; MessagingError when full."""
        self._check_name("queue", queue)
        size = self._check_message(message)
        with self._lock:
            q = self._queues.get(queue)
            if q is not None and q.waiters:
                waiter = self._take(q.waiters[0])
            else:
                waiter = None
                self._check_queue_room(queue, q, size)
                if q is None:
                    q = self._queues[queue] = _Queue()
                q.items.append((message, size))
                q.num_bytes += size
                self._total_queue_bytes += size
        metrics.BUS_PUSHED.inc()
        if waiter is not None:
            self._finish([waiter], message)

    def pull(self, inferlet_id: str, queue: str, timeout_s: float | None) -> Pending:
        """The oldest message of queue, or None after timeout_s (None: no timeout); waiters are served FIFO."""
        self._check_name("queue", queue)
        self._check_timeout(timeout_s)
        with self._lock:
            q = self._queues.get(queue)
            if q is not None and q.items:
                message, size = q.items.popleft()
                q.num_bytes -= size
                self._total_queue_bytes -= size
                self._forget_if_idle(queue, q)
                return Pending.ready(message)
            if timeout_s == 0:
                return Pending.ready(None)
            self._check_may_wait(inferlet_id)
            if q is None:
                q = self._queues[queue] = _Queue()
            return self._wait(inferlet_id, q.waiters, timeout_s, queue=queue).pending

    def queue_length(self, queue: str) -> int:
        """Messages waiting in queue (0 if it does not exist)."""
        with self._lock:
            q = self._queues.get(queue)
            return 0 if q is None else len(q.items)

    # ---- key-value store ----

    def store_set(self, key: str, value: str) -> None:
        """Set key to value; MessagingError if the store would pass its entry or byte limit."""
        self._check_name("key", key)
        value_size = self._check_message(value, what="value")
        new_size = _utf8_len(key) + value_size
        with self._lock:
            old = self._store.get(key)
            old_size = 0 if old is None else _utf8_len(key) + _utf8_len(old)
            if old is None and len(self._store) >= self.limits.max_store_entries:
                raise MessagingError(
                    f"the key-value store is full ({len(self._store)} keys, limit "
                    f"{self.limits.max_store_entries}); delete keys that are no longer needed")
            if self._store_bytes - old_size + new_size > self.limits.max_store_bytes:
                raise MessagingError(
                    f"setting key {key!r} would grow the key-value store to "
                    f"{self._store_bytes - old_size + new_size} bytes (limit {self.limits.max_store_bytes}); "
                    f"delete keys that are no longer needed or store smaller values")
            self._store[key] = value
            self._store_bytes += new_size - old_size

    def store_get(self, key: str) -> str | None:
        self._check_name("key", key)
        with self._lock:
            return self._store.get(key)

    def store_delete(self, key: str) -> bool:
        """Remove key; False if it was not set."""
        self._check_name("key", key)
        with self._lock:
            old = self._store.pop(key, None)
            if old is None:
                return False
            self._store_bytes -= _utf8_len(key) + _utf8_len(old)
            return True

    def store_keys(self, prefix: str = "") -> list[str]:
        """The keys starting with prefix ("" for all), sorted."""
        if not isinstance(prefix, str) or _utf8_len(prefix) > self.limits.max_name_bytes:
            raise MessagingError(f"a key prefix must be a string of at most {self.limits.max_name_bytes} bytes")
        with self._lock:
            return sorted(k for k in self._store if k.startswith(prefix))

    # ---- lifetime ----

    def drop(self, inferlet_id: str) -> None:
        """The inferlet ended: remove its subscriptions and buffers; its waiting calls complete with None.

        Queue contents and store entries stay: they are shared state, not owned by an inferlet.
        """
        with self._lock:
            for topic in list(self._topics_of.get(inferlet_id, ())):
                self._remove_subscription(inferlet_id, topic)
            self._topics_of.pop(inferlet_id, None)
            ended = [self._take(w) for w in list(self._waiting.get(inferlet_id, ()))]
        self._finish(ended, None)

    # ---- internals (the _take/_wait/_buffer helpers run under the lock) ----

    def _check_may_wait(self, inferlet_id: str) -> None:
        num_waiting = len(self._waiting.get(inferlet_id, ()))
        if num_waiting >= self.limits.max_waiting_calls:
            raise MessagingError(
                f"inferlet {inferlet_id} already has {num_waiting} waiting next_broadcast/pull calls "
                f"(limit {self.limits.max_waiting_calls}); wait for them before starting more")

    def _wait(self, inferlet_id: str, line: deque, timeout_s: float | None, queue: str | None = None) -> _Waiter:
        waiter = _Waiter(inferlet_id, line, queue)
        if timeout_s is not None:  # first, so a closed Timers refuses before the waiter is queued;
            # the timer cannot expire it early: _expire needs the lock this call holds
            waiter.timer = self._timers.call_later(timeout_s, lambda: self._expire(waiter))
        line.append(waiter)
        self._waiting.setdefault(inferlet_id, set()).add(waiter)
        return waiter

    def _expire(self, waiter: _Waiter) -> None:
        """Timer thread: the wait timed out unless someone took the waiter first."""
        with self._lock:
            if waiter.line is None:
                return
            self._take(waiter)
        waiter.pending.complete(None)

    def _take(self, waiter: _Waiter) -> _Waiter:
        """Remove waiter from its line (and an idle queue from the bus); the caller completes it after unlocking."""
        waiter.line.remove(waiter)
        waiter.line = None
        waiting = self._waiting.get(waiter.inferlet_id)
        if waiting is not None:
            waiting.discard(waiter)
            if not waiting:
                del self._waiting[waiter.inferlet_id]
        if waiter.queue is not None:
            q = self._queues.get(waiter.queue)
            if q is not None:
                self._forget_if_idle(waiter.queue, q)
        return waiter

    def _take_all(self, line: deque) -> list[_Waiter]:
        return [self._take(line[0]) for _ in range(len(line))]

    def _buffer(self, sub: _Subscription, message: str, size: int) -> None:
        sub.buffer.append((message, size))
        sub.buffered_bytes += size
        while len(sub.buffer) > self.limits.max_buffered_messages or sub.buffered_bytes > self.limits.max_buffered_bytes:
            _, old_size = sub.buffer.popleft()
            sub.buffered_bytes -= old_size
            sub.dropped += 1

    def _remove_subscription(self, inferlet_id: str, topic: str) -> _Subscription | None:
        subs = self._subscribers.get(topic)
        sub = None if subs is None else subs.pop(inferlet_id, None)
        if sub is None:
            return None
        if not subs:
            del self._subscribers[topic]
        topics = self._topics_of.get(inferlet_id)
        if topics is not None:
            topics.discard(topic)
            if not topics:
                del self._topics_of[inferlet_id]
        return sub

    def _check_queue_room(self, name: str, q: _Queue | None, size: int) -> None:
        items, num_bytes = (0, 0) if q is None else (len(q.items), q.num_bytes)
        if items >= self.limits.max_queue_items or num_bytes + size > self.limits.max_queue_bytes:
            raise MessagingError(
                f"queue {name!r} is full ({items} items, {num_bytes} bytes; limits "
                f"{self.limits.max_queue_items} items, {self.limits.max_queue_bytes} bytes); "
                f"the consumer is slower than the producer, retry later")
        if self._total_queue_bytes + size > self.limits.max_total_queue_bytes:
            raise MessagingError(
                f"all queues together hold {self._total_queue_bytes} bytes (limit "
                f"{self.limits.max_total_queue_bytes}); consumers are slower than producers, retry later")

    def _forget_if_idle(self, name: str, q: _Queue) -> None:
        if not q.items and not q.waiters and self._queues.get(name) is q:
            del self._queues[name]

    def _finish(self, waiters: list[_Waiter], value: str | None) -> None:
        """Outside the lock: stop their timers and complete them."""
        for waiter in waiters:
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.pending.complete(value)

    def _check_name(self, what: str, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise MessagingError(f"a {what} name must be a non-empty string, got {name!r:.80}")
        if _utf8_len(name) > self.limits.max_name_bytes:
            raise MessagingError(
                f"{what} name {name[:40]!r}... is {_utf8_len(name)} bytes (limit {self.limits.max_name_bytes}); "
                f"use a shorter name")

    def _check_message(self, message: str, what: str = "message") -> int:
        if not isinstance(message, str):
            raise MessagingError(f"a {what} must be a string, got {type(message).__name__}")
        size = _utf8_len(message)
        if size > self.limits.max_message_bytes:
            raise MessagingError(
                f"{what} is {size} bytes (limit {self.limits.max_message_bytes}); "
                f"split it or pass a store key instead")
        return size

    @staticmethod
    def _check_timeout(timeout_s: float | None) -> None:
        if timeout_s is None:
            return
        if not isinstance(timeout_s, (int, float)) or math.isnan(timeout_s) or timeout_s < 0 or math.isinf(timeout_s):
            raise MessagingError(f"timeout_s must be a finite number of seconds >= 0, or None; got {timeout_s!r}")
