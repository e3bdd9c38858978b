"""An inferlet host as a Ray actor: a ClusterHost behind the client API, which the gateway relays to.

The host serves pie.v1.Inferlets on its node's address (any free port); `address()` tells the
gateway its host id and target. Launches are placed by the directory (see cluster/actors/cluster_host.py)
using the request's prompt hint. Ray restarts a killed host actor; it comes back empty with a new
id and port, and the gateway dials it again.

The host reports to the directory every HOST_REPORT_S (cluster/actors/host_registry.py), which is how
the gateways find it, and records each inferlet it runs in the directory's instance table, so any
gateway can reach it. An inferlet whose gateway stream breaks without a Terminate (the gateway
died) runs on for DETACH_GRACE_S, its events kept for an Attach through another gateway.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from wasmtime import component as wc

from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, DirectoryHandle
from cluster.rpc.bus_service import RemoteBus
from cluster.actors.cluster_host import ClusterHost
from cluster.actors.host_registry import HOST_REPORT_S, token_digest
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, InferletService, cache_scope, serve_service
from cluster.runtime.inferlet_host import Outcome, RunningInferlet
from cluster.api.program_store import ProgramStore
from cluster.proto import pie_pb2
from cluster.runtime.sandbox import Limits
from cluster.services.http_client import HttpPolicy

log = logging.getLogger("pie.host")
DETACH_GRACE_S = 60.0  # an inferlet whose gateway stream broke waits this long for an Attach

class HostService(InferletService):
    """The client API of one ClusterHost: launches carry the prompt hint to placement."""

    def _launch(self, component: wc.Component, request: pie_pb2.LaunchRequest,
                on_message: Callable[[str], None], on_end: Callable[[Outcome], None]) -> RunningInferlet:
        return self.host.launch(component, list(request.arguments), on_message=on_message, on_end=on_end,
                                prompt_hint=request.prompt_hint, cache_scope=cache_scope(request), keep_messages=False)

    def _capacity(self) -> dict:
        return self.host.directory.capacity()

    def _instance_started(self, instance_id: str, request: pie_pb2.LaunchRequest, owner_token: str) -> None:
        try:
            self.host.directory.instance_started(instance_id, self.host.host_id, request.program_id,
                                                 token_digest(owner_token))
        except Exception as e:  # the directory is restarting: this host's next report records it again
            log.warning("%s: could not record it in the directory: %r", instance_id, e)

    def _instance_ended(self, instance_id: str) -> None:
        try:
            self.host.directory.instance_ended(instance_id)
        except Exception as e:
            log.warning("%s: could not record its end in the directory: %r", instance_id, e)

    def running_records(self) -> list[tuple[str, str, str, float]]:
        """(instance id, program id, owner token digest, started as time.time()) of what runs here."""
        offset = time.time() - time.monotonic()
        with self._lock:
            return [(iid, x.program_id, token_digest(x.owner_token), x.started + offset)
                    for iid, x in self._live.items()]

    def running_count(self) -> int:
        with self._lock:
            return len(self._live) + self._starting


class HostActor:
    def __init__(self, directory_name: str = DIRECTORY_NAME, limits: Limits = Limits(),
                 max_running: int = DEFAULT_MAX_RUNNING, address: str | None = None,
                 http_policy: HttpPolicy = HttpPolicy()):
        """`address`: where to serve (default: the node's address, for a gateway on another node)."""
        import ray

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        directory = DirectoryHandle(ray.get_actor(directory_name, namespace=NAMESPACE))
        self._stopped = threading.Event()
        token = directory.internal_token()  # what the workers and the bus require, and this host of the gateway
        # the cluster's message bus runs in the directory's process; found when an inferlet first messages
        self.host = ClusterHost(directory, limits, http_policy, bus=RemoteBus(directory.bus_target, token=token),
                                internal_token=token)
        self.service = HostService(self.host, ProgramStore(), max_running, detach_grace_s=DETACH_GRACE_S)
        self.server = serve_service(self.service, port=0, address=address or ray.util.get_node_ip_address(),
                                    token=token)
        self._directory, self._max_running = directory, max_running
        self._actor_name = ray.get_runtime_context().get_actor_name() or ""
        self._report()  # before any gateway looks for it
        threading.Thread(target=self._reporting, name="host-report", daemon=True).start()

    def _report(self) -> None:
        known = self._directory.host_alive(self.host.host_id, self.server.target, self._max_running,
                                           self._actor_name)
        if not known:  # new, or the directory restarted and forgot this host's inferlets
            self._directory.instances_restore(self.host.host_id, self.service.running_records())

    def _reporting(self) -> None:
        while not self._stopped.wait(HOST_REPORT_S):
            try:
                self._report()
            except Exception as e:  # the directory is restarting: the next round reports again
                log.debug("host report failed: %r", e)

    def running(self) -> int:
        """Inferlets running here (and starting): the pool drains a host until this is 0."""
        return self.service.running_count()

    def shutdown(self, grace_s: float = 2.0) -> None:
        """Stop serving (the pool removes this host): no more reports, running calls end after `grace_s`."""
        self._stopped.set()
        self.server.stop(grace_s)

    def move_inferlet(self, instance_id: str, to_worker: str):
        """Move a running inferlet of this host to another worker, between its steps (ClusterHost.move_inferlet)."""
        return self.host.move_inferlet(instance_id, to_worker)

    def move_inferlets_off(self, worker_id: str):
        """This host's running inferlets off `worker_id` (ClusterHost.move_inferlets_off)."""
        return self.host.move_inferlets_off(worker_id)

    def drain_worker(self, worker_id: str):
        """This host's running inferlets, then every export, off `worker_id` (ClusterHost.drain_worker)."""
        return self.host.drain_worker(worker_id)

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

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex), for placement checks."""
        import ray

        return ray.get_runtime_context().get_node_id()
