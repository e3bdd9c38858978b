"""The host's timer thread and message bus: topics, queues, the key-value store, with real threads."""
import threading
import time

import pytest

from cluster.errors import MessagingError
from cluster.services.messaging import BusLimits, MessageBus
from cluster.pending import Pending
from cluster.services.timers import Timers, sleep

WAIT = 5.0  # seconds a test waits for something that should happen at once; only hit on failure


@pytest.fixture
def timers():
    with Timers() as t:
        yield t


@pytest.fixture
def bus(timers):
    return MessageBus(BusLimits(), timers)


def later(seconds: float, fn) -> threading.Thread:
    """Run fn on another thread after a delay, like another inferlet acting."""
    def run():
        time.sleep(seconds)
        fn()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# ---- timers ----

def test_timers_fire_in_deadline_order_and_cancel_works(timers):
    fired = []
    all_fired = threading.Event()
    for delay, name in [(0.15, "c"), (0.05, "a"), (0.10, "b"), (0.10, "b2")]:
        timers.call_later(delay, lambda n=name: fired.append(n))
    cancelled = timers.call_later(0.12, lambda: fired.append("cancelled"))
    timers.call_later(0.2, all_fired.set)
    assert cancelled.cancel() is True
    assert cancelled.cancel() is False
    assert all_fired.wait(WAIT)
    assert fired == ["a", "b", "b2", "c"]  # equal deadlines keep scheduling order
    assert len(timers) == 0


def test_timer_callback_exception_does_not_kill_the_thread(timers, caplog):
    ok = threading.Event()
    timers.call_later(0, lambda: 1 / 0)
    timers.call_later(0.01, ok.set)
    assert ok.wait(WAIT)
    assert any("timer callback" in r.getMessage() for r in caplog.records)


def test_sleep_completes_with_none_after_the_delay(timers):
    start = time.monotonic()
    p = sleep(timers, 0.05)
    assert not p.done
    assert p.wait(WAIT) is None
    assert time.monotonic() - start >= 0.05


def test_timers_refuse_bad_delays_and_calls_after_close():
    t = Timers()
    with pytest.raises(ValueError):
        t.call_later(-1, lambda: None)
    with pytest.raises(ValueError):
        t.call_later(float("nan"), lambda: None)
    never = []
    t.call_later(10, lambda: never.append(1))
    t.close()
    t.close()  # idempotent
    with pytest.raises(RuntimeError):
        t.call_later(0, lambda: None)
    assert never == []


def test_a_far_deadline_does_not_stop_other_timers(timers):
    timers.call_later(2.0 ** 64 / 1000, lambda: None)  # a u64 of milliseconds: past threading.TIMEOUT_MAX
    assert sleep(timers, 0.01).wait(WAIT) is None
    assert timers._thread.is_alive()


def test_many_cancelled_timers_are_compacted(timers):
    handles = [timers.call_later(3600, lambda: None) for _ in range(200)]
    for h in handles:
        h.cancel()
    assert len(timers) == 0
    assert len(timers._heap) < 200  # long cancelled timeouts do not wait an hour to leave the heap


# ---- topics ----

def test_broadcast_reaches_subscribers_but_not_the_sender_or_others(bus):
    for who in ("a", "b", "sender"):
        bus.subscribe(who, "news")
    bus.subscribe("c", "other")
    assert bus.broadcast("sender", "news", "hello") == 2
    assert bus.next_broadcast("a", "news", 0).wait(WAIT) == "hello"
    assert bus.next_broadcast("b", "news", 0).wait(WAIT) == "hello"
    assert bus.next_broadcast("sender", "news", 0).wait(WAIT) is None  # nothing buffered: poll gives None
    assert bus.next_broadcast("c", "other", 0).wait(WAIT) is None
    assert bus.broadcast("x", "nobody-listens", "m") == 0


def test_subscribe_is_idempotent_and_unsubscribe_stops_delivery(bus):
    assert bus.subscribe("a", "t") is True
    assert bus.subscribe("a", "t") is False
    assert bus.unsubscribe("a", "t") is True
    assert bus.unsubscribe("a", "t") is False
    assert bus.broadcast("s", "t", "m") == 0
    with pytest.raises(MessagingError, match="not subscribed"):
        bus.next_broadcast("a", "t", 0)


def test_next_broadcast_waits_for_a_message_sent_later_from_another_thread(bus):
    bus.subscribe("a", "t")
    p = bus.next_broadcast("a", "t", timeout_s=WAIT)
    assert not p.done
    later(0.05, lambda: bus.broadcast("s", "t", "late news"))
    assert p.wait(WAIT) == "late news"


def test_next_broadcast_times_out_with_none(bus):
    bus.subscribe("a", "t")
    start = time.monotonic()
    p = bus.next_broadcast("a", "t", timeout_s=0.1)
    assert p.wait(WAIT) is None
    assert 0.1 <= time.monotonic() - start < 0.1 * 20
    bus.broadcast("s", "t", "after")  # the timed-out waiter is gone: the message is buffered
    assert bus.next_broadcast("a", "t", 0).wait(WAIT) == "after"


def test_waiting_next_broadcast_calls_are_served_in_order(bus):
    bus.subscribe("a", "t")
    first, second = bus.next_broadcast("a", "t", None), bus.next_broadcast("a", "t", None)
    bus.broadcast("s", "t", "1")
    assert first.wait(WAIT) == "1" and not second.done
    bus.broadcast("s", "t", "2")
    assert second.wait(WAIT) == "2"


def test_a_flood_drops_the_oldest_messages_and_counts_them(timers):
    bus = MessageBus(BusLimits(max_buffered_messages=4), timers)
    bus.subscribe("slow", "t")
    for i in range(10):
        assert bus.broadcast("flooder", "t", f"m{i}") == 1
    assert bus.dropped("slow", "t") == 6
    got = [bus.next_broadcast("slow", "t", 0).wait(WAIT) for _ in range(5)]
    assert got == ["m6", "m7", "m8", "m9", None]


def test_the_buffer_is_also_bounded_in_bytes(timers):
    bus = MessageBus(BusLimits(max_buffered_bytes=10), timers)
    bus.subscribe("slow", "t")
    for message in ("aaaa", "bbbb", "cccc"):
        bus.broadcast("s", "t", message)
    assert bus.dropped("slow", "t") == 1
    assert bus.next_broadcast("slow", "t", 0).wait(WAIT) == "bbbb"


def test_unsubscribe_ends_waiting_calls_with_none(bus):
    bus.subscribe("a", "t")
    p = bus.next_broadcast("a", "t", None)
    bus.unsubscribe("a", "t")
    assert p.wait(WAIT) is None


def test_subscriptions_and_waiting_calls_are_limited_per_inferlet(timers):
    bus = MessageBus(BusLimits(max_subscriptions=2, max_waiting_calls=2), timers)
    bus.subscribe("a", "t1")
    bus.subscribe("a", "t2")
    with pytest.raises(MessagingError, match="unsubscribe"):
        bus.subscribe("a", "t3")
    bus.next_broadcast("a", "t1", None)
    bus.pull("a", "q", None)
    with pytest.raises(MessagingError, match="waiting"):
        bus.next_broadcast("a", "t2", None)
    with pytest.raises(MessagingError, match="waiting"):
        bus.pull("a", "q2", None)
    assert bus.queue_length("q2") == 0 and "q2" not in bus._queues


# ---- queues ----

def test_push_pull_is_fifo(bus):
    for i in range(5):
        bus.push("producer", "jobs", f"job{i}")
    assert bus.queue_length("jobs") == 5
    assert [bus.pull("c", "jobs", 0).wait(WAIT) for _ in range(6)] == [f"job{i}" for i in range(5)] + [None]
    assert "jobs" not in bus._queues  # an empty queue with no waiters is forgotten


def test_each_message_goes_to_exactly_one_of_many_waiting_pullers(bus):
    pullers = [bus.pull(f"c{i}", "jobs", WAIT) for i in range(4)]
    results = {}

    def produce():
        for i in range(4):
            bus.push("producer", "jobs", f"job{i}")

    later(0.02, produce)
    for i, p in enumerate(pullers):
        results[i] = p.wait(WAIT)
    assert results == {i: f"job{i}" for i in range(4)}  # waiters served first come, first served
    assert bus.queue_length("jobs") == 0


def test_concurrent_producers_and_consumers_lose_and_duplicate_nothing(bus):
    num_producers, per_producer = 4, 200
    received: list[str] = []
    received_lock = threading.Lock()
    all_received = threading.Event()
    total = num_producers * per_producer

    def on_message(p: Pending):
        with received_lock:
            if p.value is not None:
                received.append(p.value)
            if len(received) == total:
                all_received.set()
                return
        bus.pull("consumer", "jobs", WAIT).on_done(on_message)  # re-entrant: completed outside the bus lock

    for _ in range(3):
        bus.pull("consumer", "jobs", WAIT).on_done(on_message)
    producers = [threading.Thread(target=lambda k=k: [bus.push(f"p{k}", "jobs", f"{k}:{i}")
                                                        for i in range(per_producer)]) for k in range(num_producers)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    assert all_received.wait(WAIT)
    assert sorted(received) == sorted(f"{k}:{i}" for k in range(num_producers) for i in range(per_producer))
    for k in range(num_producers):  # each producer's messages arrive in its order
        mine = [m for m in received if m.startswith(f"{k}:")]
        assert mine == [f"{k}:{i}" for i in range(per_producer)]
    bus.drop("consumer")


def test_a_full_queue_refuses_pushes(timers):
    bus = MessageBus(BusLimits(max_queue_items=3, max_queue_bytes=100), timers)
    for i in range(3):
        bus.push("p", "q", "x")
    with pytest.raises(MessagingError, match=r"queue 'q' is full \(3 items.*slower than the producer, retry later"):
        bus.push("p", "q", "x")
    bus.push("p", "other", "a" * 100)
    with pytest.raises(MessagingError, match="full"):
        bus.push("p", "other", "a")
    assert bus.pull("c", "q", 0).wait(WAIT) == "x"
    bus.push("p", "q", "x")  # room again


def test_all_queues_together_are_bounded(timers):
    bus = MessageBus(BusLimits(max_total_queue_bytes=10), timers)
    bus.push("p", "q1", "a" * 6)
    with pytest.raises(MessagingError, match="all queues together"):
        bus.push("p", "q2", "b" * 6)


def test_pull_times_out_with_none_and_leaves_no_queue_behind(bus):
    start = time.monotonic()
    assert bus.pull("c", "q", timeout_s=0.1).wait(WAIT) is None
    assert 0.1 <= time.monotonic() - start < 0.1 * 20
    assert "q" not in bus._queues and not bus._waiting
    bus.push("p", "q", "kept")  # no stale waiter swallows it
    assert bus.queue_length("q") == 1


# ---- key-value store ----

def test_store_set_get_delete_keys(bus):
    assert bus.store_get("k") is None
    bus.store_set("cfg/b", "2")
    bus.store_set("cfg/a", "1")
    bus.store_set("other", "x")
    bus.store_set("cfg/a", "one")
    assert bus.store_get("cfg/a") == "one"
    assert bus.store_keys("cfg/") == ["cfg/a", "cfg/b"]
    assert bus.store_keys("") == ["cfg/a", "cfg/b", "other"]
    assert bus.store_delete("cfg/a") is True
    assert bus.store_delete("cfg/a") is False
    assert bus.store_keys("cfg/") == ["cfg/b"]


def test_store_limits_count_entries_and_bytes(timers):
    bus = MessageBus(BusLimits(max_store_entries=2, max_store_bytes=20), timers)
    bus.store_set("a", "123456789")  # 10 bytes with its key
    bus.store_set("b", "123")  # 4
    with pytest.raises(MessagingError, match="store is full"):
        bus.store_set("c", "")
    with pytest.raises(MessagingError, match="21 bytes"):
        bus.store_set("b", "1234567890")  # the new size only: 10 + 11
    bus.store_set("b", "123456789")  # 10 + 10 fits exactly
    bus.store_delete("a")
    bus.store_set("c", "x")
    assert bus.store_keys("") == ["b", "c"]
    assert bus._store_bytes == 10 + 2


# ---- validation ----

@pytest.mark.parametrize("call", [
    lambda bus, name: bus.subscribe("a", name),
    lambda bus, name: bus.broadcast("a", name, "m"),
    lambda bus, name: bus.push("a", name, "m"),
    lambda bus, name: bus.pull("a", name, 0),
    lambda bus, name: bus.store_set(name, "v"),
    lambda bus, name: bus.store_get(name),
])
@pytest.mark.parametrize("name", ["", "é" * 129, None])  # 258 utf-8 bytes > 256
def test_bad_names_are_refused(bus, call, name):
    with pytest.raises(MessagingError):
        call(bus, name)


def test_oversize_messages_and_bad_timeouts_are_refused(bus):
    limit = bus.limits.max_message_bytes
    bus.subscribe("a", "t")
    bus.push("p", "q", "x" * limit)  # exactly the limit is fine
    for call in (lambda m: bus.broadcast("s", "t", m), lambda m: bus.push("p", "q", m),
                 lambda m: bus.store_set("k", m)):
        with pytest.raises(MessagingError, match=f"limit {limit}"):
            call("x" * (limit + 1))
        with pytest.raises(MessagingError, match="not valid unicode"):
            call("\ud800")
    with pytest.raises(MessagingError, match="timeout_s"):
        bus.pull("c", "q2", -1)
    with pytest.raises(MessagingError, match="timeout_s"):
        bus.next_broadcast("a", "t", float("inf"))


# ---- lifetime ----

def test_drop_completes_waiters_with_none_and_keeps_shared_state(bus, timers):
    bus.subscribe("gone", "t")
    bus.subscribe("stays", "t")
    waiting_topic = bus.next_broadcast("gone", "t", 60)
    waiting_queue = bus.pull("gone", "q", 60)
    other = bus.pull("stays", "q", None)
    bus.push("p", "kept-queue", "m")
    bus.store_set("k", "v")
    bus.drop("gone")
    assert waiting_topic.wait(WAIT) is None and waiting_queue.wait(WAIT) is None
    assert len(timers) == 0  # their timeouts were cancelled
    assert bus.broadcast("s", "t", "m") == 1  # only "stays" is left on the topic
    assert bus.dropped("gone", "t") == 0
    with pytest.raises(MessagingError, match="not subscribed"):
        bus.next_broadcast("gone", "t", 0)
    assert bus.queue_length("kept-queue") == 1 and bus.store_get("k") == "v"
    bus.push("p", "q", "for stays")  # the dropped puller no longer takes messages
    assert other.wait(WAIT) == "for stays"
    bus.drop("never-existed")  # harmless
