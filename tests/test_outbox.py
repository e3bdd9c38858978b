"""The bounded outbox between an inferlet's send and its client (cluster/runtime/outbox.py)."""
import threading

import pytest

from cluster.runtime.outbox import Outbox


def test_puts_past_the_bound_wait_for_the_reader_in_order():
    box = Outbox(max_messages=2, max_bytes=1000)
    first, second, third = box.put("a"), box.put("b"), box.put("c")
    assert first.done and second.done and not third.done  # two fit; the third waits
    assert box.get() == "a"
    assert third.done  # the reader made room
    fourth = box.put("d")
    assert not fourth.done
    assert [box.get(), box.get(), box.get()] == ["b", "c", "d"] and fourth.done


def test_bytes_bound_and_one_large_message_always_fits_an_empty_box():
    box = Outbox(max_messages=100, max_bytes=10)
    assert box.put("x" * 50).done  # alone: it fits (its size was checked against max_message_bytes)
    small = box.put("y")
    assert not small.done and box.buffered_bytes == 50
    assert box.get() == "x" * 50 and small.done and box.buffered_bytes == 1


def test_the_end_comes_after_every_waiting_message():
    box = Outbox(max_messages=1, max_bytes=100)
    box.put("a")
    blocked = box.put("b")
    box.put(Ellipsis)  # not a message: the end
    assert [box.get(), box.get(), box.get()] == ["a", "b", Ellipsis] and blocked.done


def test_a_reader_waits_for_the_next_item_or_times_out():
    box = Outbox(max_messages=4, max_bytes=100)
    with pytest.raises(TimeoutError):
        box.get(timeout=0.05)
    threading.Timer(0.05, lambda: box.put("late")).start()
    assert box.get(timeout=10) == "late"


# -- ReplayOutbox: the same bounds, numbered, with a history a new reader can resume from -------------
from cluster.runtime.inferlet_host import Outcome  # noqa: E402
from cluster.runtime.replay_outbox import Detached, ReplayGone, ReplayOutbox  # noqa: E402


def test_a_new_reader_resumes_from_any_seq_in_the_history_and_the_old_one_is_detached():
    box = ReplayOutbox(max_messages=10, max_bytes=1000)
    for text in "abcde":
        box.put(text)
    old = box.reader
    assert [box.next(old) for _ in range(3)] == [(1, "a"), (2, "b"), (3, "c")]
    new = box.attach(2)  # it had "a" only
    with pytest.raises(Detached):
        box.next(old)
    assert [box.next(new) for _ in range(4)] == [(2, "b"), (3, "c"), (4, "d"), (5, "e")]  # replayed, then new
    box.end(Outcome("i"))
    seq, end = box.next(new)
    assert seq == 6 and isinstance(end, Outcome)
    again = box.attach(6)  # after the end: the end is kept too
    assert box.next(again) == (6, end)


def test_an_attach_outside_what_is_held_is_refused_saying_what_is_held():
    box = ReplayOutbox(max_messages=10, max_bytes=1000, replay_messages=2)
    for text in "abcde":
        box.put(text)
    for _ in range(5):
        box.next(box.reader)
    with pytest.raises(ReplayGone, match="keeps events 4 to 5"):
        box.attach(3)  # dropped from the history
    with pytest.raises(ReplayGone, match="never sent"):
        box.attach(7)
    with pytest.raises(TimeoutError):
        box.next(box.attach(6), timeout=0.01)  # the next one: allowed, with nothing to replay yet


def test_the_history_is_bounded_in_bytes_and_leaves_the_outbox_bounds_as_they_were():
    box = ReplayOutbox(max_messages=2, max_bytes=1000, replay_bytes=10)
    held = [box.put(text) for text in ("x" * 6, "y" * 6, "z")]
    assert [p.done for p in held] == [True, True, False]  # the outbox's bound: the third send waits
    reader = box.reader
    box.next(reader)
    assert held[2].done  # the reader made room, as in an Outbox
    box.next(reader)
    with pytest.raises(ReplayGone):
        box.attach(1)  # 12 bytes read: the first no longer fits the 10-byte history
    assert box.next(box.attach(2)) == (2, "y" * 6)


def test_a_detached_reader_waiting_for_an_item_wakes_up():
    box = ReplayOutbox(max_messages=10, max_bytes=1000)
    reader, woke = box.reader, []

    def wait():
        try:
            box.next(reader, timeout=10)
        except Detached:
            woke.append(True)

    thread = threading.Thread(target=wait)
    thread.start()
    box.attach(1)
    thread.join(5)
    assert woke == [True]
