"""Routes: how a running inferlet's calls wait for its move (cluster/actors/inferlet_move.py), without
workers: the gate, the calls in flight a move waits for, and the route set when it commits."""
import threading
import time

import pytest

from cluster.actors.inferlet_move import Route, Routes
from cluster.actors.page_map import PageMap
from cluster.errors import InferletNotMovable


def test_a_move_waits_for_the_calls_in_flight_then_queues_passes_and_holds_page_calls():
    routes = Routes()
    gate, route = routes.later("a")  # a pass in flight on the old worker
    assert gate is None and route is None
    closed = []
    mover = threading.Thread(target=lambda: closed.append(routes.close("a", 10)))
    mover.start()
    time.sleep(0.2)
    assert not closed, "the move began with a pass of the inferlet still in flight"
    assert routes.later("b") == (None, None)  # other inferlets are not held up
    routes.leave("b")
    routes.leave("a")  # the pass is done
    mover.join(5)
    [gate] = closed
    queued, _ = routes.later("a")
    assert queued is gate and not gate.done  # a pass made now waits for the move, without blocking
    entered = []

    def page_call():
        with routes.calling("a") as r:
            entered.append(r)

    caller = threading.Thread(target=page_call)
    caller.start()
    time.sleep(0.2)
    assert not entered, "a page call went through during the move"
    new = Route(remote=None, worker_id="w1", pages=PageMap())
    routes.open("a", gate, new)
    caller.join(5)
    assert entered == [new] and gate.done
    assert routes.route("a") is new
    assert routes.pop("a") is new and routes.route("a") is None
    assert routes.pop("a") is new  # a late release still finds where its pages are


def test_a_second_move_or_a_stuck_call_is_refused_and_the_gate_opens_again():
    routes = Routes()
    gate = routes.close("a", 1)
    with pytest.raises(InferletNotMovable, match="'a' is already moving"):
        routes.close("a", 1)
    routes.open("a", gate)  # aborted: no new route
    assert routes.route("a") is None
    routes.later("a")  # a call that never ends
    with pytest.raises(InferletNotMovable, match=r"'a' still had 1 calls in flight after 0 s"):
        routes.close("a", 0.2)
    assert routes.later("a")[0] is None  # not left closed
