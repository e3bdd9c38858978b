"""An inferlet host as a Ray actor: a ClusterHost behind the client API, which the gateway relays to.

The host serves pie.v1.Inferlets on its node's address (any free port); `address()` tells the
gateway its host id and target. Launches are placed by the directory (see cluster/actors/cluster_host.py)
using the request's prompt hint. Ray restarts a killed host actor; it comes back empty with a new
id and port, and the gateway dials it again.
"""
from __future__ import annotations

import logging
from typing import Callable

from wasmtime import component as wc

from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, DirectoryHandle
from cluster.rpc.bus_service import RemoteBus
from cluster.actors.cluster_host import ClusterHost
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, InferletService, cache_scope, serve_service
from cluster.runtime.inferlet_host import Outcome, RunningInferlet
from cluster.api.program_store import ProgramStore
from cluster.proto import pie_pb2
from cluster.runtime.sandbox import Limits
from cluster.services.http_client import HttpPolicy


class HostService(InferletService):
    """The client API of one ClusterHost: launches carry the prompt hint to placement."""

    def _launch(self, component: wc.Component, request: pie_pb2.LaunchRequest,
                on_message: Callable[[str], None], on_end: Callable[[Outcome], None]) -> RunningInferlet:
        return self.host.launch(component, list(request.arguments), on_message=on_message, on_end=on_end,
                                prompt_hint=request.prompt_hint, cache_scope=cache_scope(request), keep_messages=False)

    def _capacity(self) -> dict:
        return self.host.directory.capacity()


class HostActor:
    def __init__(self, directory_name: str = DIRECTORY_NAME, limits: Limits = Limits(),
                 max_running: int = DEFAULT_MAX_RUNNING, address: str | None = None,
                 http_policy: HttpPolicy = HttpPolicy()):
        """`address`: where to serve (default: the node's address, for a gateway on another node)."""
        import ray

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        directory = DirectoryHandle(ray.get_actor(directory_name, namespace=NAMESPACE))
        token = directory.internal_token()  # what the workers and the bus require, and this host of the gateway
        # the cluster's message bus runs in the directory's process; found when an inferlet first messages
        self.host = ClusterHost(directory, limits, http_policy, bus=RemoteBus(directory.bus_target, token=token),
                                internal_token=token)
        service = HostService(self.host, ProgramStore(), max_running)
        self.server = serve_service(service, port=0, address=address or ray.util.get_node_ip_address(), token=token)

    def address(self) -> tuple[str, str]:
        """(host id, target of its client API)."""
        return self.host.host_id, self.server.target

    def metrics_text(self) -> str:
        """This process's Prometheus metrics (the gateway gathers them onto its /metrics)."""
        from cluster import metrics

        return metrics.exposition().decode()

    def pid(self) -> int:
        import os

        return os.getpid()
