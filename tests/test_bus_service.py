"""The cluster's message bus over real gRPC on loopback: RemoteBus clients (one per host) sharing
one MessageBus behind a BusServer."""
import pytest

from cluster.rpc.bus_service import BusServer, BusUnavailable, RemoteBus
from cluster.errors import MessagingError
from cluster.services.messaging import BusLimits, MessageBus
from cluster.services.timers import Timers
from helpers import wait_until


@pytest.fixture
def timers():
    t = Timers()
    yield t
    t.close()


@pytest.fixture
def served(timers):
    server = BusServer(MessageBus(BusLimits(max_message_bytes=1000), timers))
    yield server
    server.stop(0)


@pytest.fixture
def hosts(served):
    """Two hosts' connections to the one bus."""
    a, b = RemoteBus(lambda: served.target, timeout_s=10), RemoteBus(lambda: served.target, timeout_s=10)
    yield a, b
    a.close()
    b.close()


def test_inferlets_on_two_hosts_share_topics_queues_and_the_store(hosts):
    a, b = hosts
    assert a.subscribe("inferlet-a", "news") is True
    waiting = a.next_broadcast("inferlet-a", "news", 10.0)
    assert b.broadcast("inferlet-b", "news", "hello from b") == 1
    assert waiting.wait(10) == "hello from b"
    pulled = b.pull("inferlet-b", "jobs", 10.0)  # waits on the bus until a push from the other host
    assert not pulled.done
    a.push("inferlet-a", "jobs", "work item")
    assert pulled.wait(10) == "work item"
    b.store_set("shared-key", "shared-value")
    assert a.store_get("shared-key") == "shared-value" and a.store_keys("shared") == ["shared-key"]
    assert a.store_delete("shared-key") is True and b.store_get("shared-key") is None
    assert b.pull("inferlet-b", "jobs", 0.05).wait(10) is None  # the bus's timeout, answered as None


def test_the_bus_refuses_with_its_own_error_and_message(hosts):
    a, _ = hosts
    with pytest.raises(MessagingError, match="limit 1000"):
        a.push("inferlet-a", "jobs", "x" * 2000)
    with pytest.raises(MessagingError, match="not subscribed"):
        a.next_broadcast("inferlet-a", "never-subscribed", 1.0).wait(10)


def test_an_ended_inferlet_and_a_closed_host_leave_nothing_subscribed(served, hosts):
    a, b = hosts
    a.subscribe("inferlet-a", "news")
    waiting = a.next_broadcast("inferlet-a", "news", 30.0)
    a.drop("inferlet-a")  # the inferlet ended: its waiting call ends with None
    assert waiting.wait(10) is None
    assert b.broadcast("inferlet-b", "news", "anyone?") == 0
    a.subscribe("inferlet-a2", "news")
    assert b.broadcast("inferlet-b", "news", "one") == 1
    a.close()  # the host went away without dropping its inferlets: the bus drops them when its stream ends
    wait_until(lambda: b.broadcast("inferlet-b", "news", "two") == 0, 10, "the closed host's subscriber to be dropped")


def test_a_lost_bus_fails_calls_with_bus_unavailable_and_a_restarted_one_is_dialled_again(timers):
    first = BusServer(MessageBus(BusLimits(), timers))
    where = [first.target]
    host = RemoteBus(lambda: where[0], timeout_s=10)
    try:
        host.store_set("k", "v")
        first.stop(0)
        with pytest.raises(BusUnavailable, match=f"the message bus at {first.target}"):
            wait_until(lambda: host.store_get("k") and False, 10, "the lost bus to be noticed")
        second = BusServer(MessageBus(BusLimits(), timers))  # restarted: empty, at a new address
        where[0] = second.target
        try:
            assert host.store_get("k") is None
            host.store_set("k", "again")
            assert host.store_get("k") == "again"
        finally:
            second.stop(0)
    finally:
        host.close()


def test_a_bus_that_cannot_be_found_is_unavailable_not_a_crash():
    def nowhere():
        raise ValueError("Failed to look up actor with name 'pie-bus'")

    host = RemoteBus(nowhere)
    with pytest.raises(BusUnavailable, match="cannot be found.*pie-bus"):
        host.subscribe("inferlet-a", "news")
    assert host.pull("inferlet-a", "jobs", 1.0).error is not None  # a waiting call fails as a Pending
    host.drop("inferlet-a")  # and dropping an inferlet never raises


def test_a_bus_with_a_token_serves_only_hosts_that_send_it(timers):
    server = BusServer(MessageBus(BusLimits(), timers), token="cluster-secret")
    try:
        stranger = RemoteBus(lambda: server.target, timeout_s=10)
        with pytest.raises(BusUnavailable, match="UNAUTHENTICATED.*needs a token"):
            stranger.store_set("k", "v")
        wrong = RemoteBus(lambda: server.target, timeout_s=10, token="guess")
        with pytest.raises(BusUnavailable, match="UNAUTHENTICATED.*wrong"):
            wrong.store_keys()
        member = RemoteBus(lambda: server.target, timeout_s=10, token="cluster-secret")
        member.store_set("k", "v")
        assert member.store_get("k") == "v"
        for host in (stranger, wrong, member):
            host.close()
    finally:
        server.stop(0)
