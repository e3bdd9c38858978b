"""The cluster's message bus: one MessageBus served to every host, so inferlets message across hosts.

In embedded mode the inferlets of a host share its own MessageBus. In cluster mode the gateway
spreads inferlets over hosts (and a host over workers), so a per-host bus would only connect the
inferlets that happened to land together. Instead one MessageBus, served with `BusServer` in the
directory actor's process (`Directory.bus_target()`, started when an inferlet first messages: an
actor of its own would add ~140 idle wake-ups a second to every node's background), is the
cluster's; each host talks to it through a `RemoteBus`, which
has the MessageBus methods the messaging imports call, over one handler-call stream
(cluster/rpc/call_stream.py, the `Bus` service of cluster/proto/worker.proto).

Calls that answer at once (subscribe, broadcast, push, the store) wait for their reply: a loopback
or LAN round trip. `next_broadcast` and `pull` return a Pending completed by the bus's reply, whose
timeouts run on the bus's own timers. Limits and refusals are the bus's (MessagingError, re-raised
on the host with the bus's message). When a host's stream ends (it closed, or died), the bus drops
every inferlet that called through it; if the bus is lost, messaging calls fail with BusUnavailable
until the host dials it again (Ray restarts the directory, and with it an empty bus).
"""
from __future__ import annotations

import threading

from cluster.rpc.call_stream import CallClient, CallServer, CallServicer
from cluster.errors import InferletError
from cluster.services.messaging import MessageBus
from cluster.pending import Pending
from cluster.proto import worker_pb2_grpc


class BusUnavailable(InferletError):
    """The cluster's message bus cannot be reached (it died, or is restarting)."""


class BusServer(CallServer):
    """A MessageBus served on address:port (port 0: any free one); `target` is what hosts dial.
    With `token`, only hosts that send it are served."""

    def __init__(self, bus: MessageBus, address: str = "127.0.0.1", port: int = 0, max_hosts: int = 64,
                 token: str | None = None):
        self.bus = b = bus
        servicer = CallServicer({  # method -> fn(inferlet id, *args); the waiting ones return a Pending
            "subscribe": b.subscribe, "unsubscribe": b.unsubscribe, "broadcast": b.broadcast,
            "next_broadcast": b.next_broadcast, "push": b.push, "pull": b.pull, "drop": b.drop,
            "store_set": lambda _, key, value: b.store_set(key, value),
            "store_get": lambda _, key: b.store_get(key),
            "store_delete": lambda _, key: b.store_delete(key),
            "store_keys": lambda _, prefix: b.store_keys(prefix),
        }, release=b.drop, releasing="drop")
        super().__init__(worker_pb2_grpc.add_BusServicer_to_server, servicer, address, port, max_hosts, token, "bus")


class RemoteBus:
    """The MessageBus methods the messaging imports use, answered by the bus at `find_target()`.
    The connection is dialled on first use, and again after it was lost (the bus restarted)."""

    def __init__(self, find_target, timeout_s: float = 30.0, token: str | None = None):
        """`find_target()`: the bus's current address (asked again on each reconnect). `token`: the bus's."""
        self._find_target = find_target
        self.timeout_s = timeout_s
        self._token = token
        self._lock = threading.Lock()
        self._conn: CallClient | None = None

    def _connection(self) -> CallClient:
        with self._lock:
            if self._conn is None or self._conn.broken:
                if self._conn is not None:
                    self._conn.close()
                try:
                    target = self._find_target()
                except Exception as e:
                    raise BusUnavailable(f"the message bus cannot be found: {e}") from None
                self._conn = CallClient(target, lambda channel: worker_pb2_grpc.BusStub(channel).Calls,
                                        BusUnavailable, f"the message bus at {target}", self.timeout_s,
                                        token=self._token)
            return self._conn

    def _sync(self, method: str, holder: str, *args):
        return self._connection().sync(method, holder, *args)

    def _later(self, method: str, holder: str, *args) -> Pending:
        try:
            return self._connection().call(method, holder, *args)
        except BusUnavailable as e:
            return Pending.failed(e)

    # -- topics ----------------------------------------------------------------------------------
    def subscribe(self, inferlet_id: str, topic: str) -> bool:
        return self._sync("subscribe", inferlet_id, topic)

    def unsubscribe(self, inferlet_id: str, topic: str) -> bool:
        return self._sync("unsubscribe", inferlet_id, topic)

    def broadcast(self, sender_id: str, topic: str, message: str) -> int:
        return self._sync("broadcast", sender_id, topic, message)

    def next_broadcast(self, inferlet_id: str, topic: str, timeout_s: float | None) -> Pending:
        return self._later("next_broadcast", inferlet_id, topic, timeout_s)

    # -- queues ----------------------------------------------------------------------------------
    def push(self, inferlet_id: str, queue: str, message: str) -> None:
        self._sync("push", inferlet_id, queue, message)

    def pull(self, inferlet_id: str, queue: str, timeout_s: float | None) -> Pending:
        return self._later("pull", inferlet_id, queue, timeout_s)

    # -- the store -------------------------------------------------------------------------------
    def store_set(self, key: str, value: str) -> None:
        self._sync("store_set", "", key, value)

    def store_get(self, key: str) -> str | None:
        return self._sync("store_get", "", key)

    def store_delete(self, key: str) -> bool:
        return self._sync("store_delete", "", key)

    def store_keys(self, prefix: str = "") -> list[str]:
        return list(self._sync("store_keys", "", prefix))

    # -- lifetime --------------------------------------------------------------------------------
    def drop(self, inferlet_id: str) -> None:
        """The inferlet ended: sent without waiting (a lost bus has dropped it already)."""
        self._later("drop", inferlet_id)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
