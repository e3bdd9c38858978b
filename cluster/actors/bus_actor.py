"""The cluster's message bus as a Ray actor: one MessageBus that the inferlets of every host share.

The actor serves the bus with cluster.bus_service.BusServer on its node's address; hosts find it
by name (BUS_NAME) and ask `target()` where to dial, each time they (re)connect. Ray restarts it
when it dies: it comes back empty at a new address (topics, queues and the store were in memory),
and the hosts' next messaging calls dial it again.
"""
from __future__ import annotations

from cluster.actors.directory_actor import NAMESPACE
from cluster.bus_service import BusServer
from cluster.messaging import BusLimits, MessageBus
from cluster.timers import Timers

BUS_NAME = "pie-bus"


class BusActor:
    def __init__(self, limits: BusLimits = BusLimits(), address: str | None = None):
        """`address`: where to serve (default: the node's address, for hosts on other nodes)."""
        import ray

        self.server = BusServer(MessageBus(limits, Timers()), address=address or ray.util.get_node_ip_address())

    def target(self) -> str:
        return self.server.target


def find_bus_target(name: str = BUS_NAME) -> str:
    """Where the cluster's bus serves now (raises ValueError when no bus actor of that name exists)."""
    import ray

    return ray.get(ray.get_actor(name, namespace=NAMESPACE).target.remote(), timeout=30)
