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
