"""The KV-page directory as a Ray actor, and the synchronous handle hosts and the gateway call it through.

`Directory` is cluster.actors.kv_directory.KvDirectory plus what a cluster needs around it: where each
worker serves its handler calls (its gRPC target, which changes when Ray restarts it) and the
model the workers run (so a host can tokenize before it has dialled any worker), the cluster's
message bus (`bus_target()`, see cluster/rpc/bus_service.py), and what every gateway shares: the
hosts, the table of inferlets and the uploaded programs (cluster/actors/host_registry.py). Ray runs it as
the named actor DIRECTORY_NAME; `DirectoryHandle` makes its methods plain blocking calls that
raise the directory's own errors, so cluster code reads the same against a Directory in process
(tests) or the actor.
"""
from __future__ import annotations

import threading

from cluster.rpc.bus_service import BusServer
from cluster.errors import InferletError
from cluster.actors.directory_records import Reclaimed
from cluster.actors.host_registry import HostRegistry
from cluster.actors.kv_directory import KvDirectory
from cluster.errors import DirectoryUnavailable, NoLiveWorker
from cluster.services.messaging import BusLimits, MessageBus
from cluster.services.timers import Timers

DIRECTORY_NAME = "pie-directory"
NAMESPACE = "pie"  # the Ray namespace of every cluster-mode actor


class Directory(KvDirectory, HostRegistry):
    def __init__(self, page_size: int, cache_key: str = "", bus_address: str | None = None,
                 internal_token: str | None = None):
        """`bus_address`: where the cluster's message bus serves once started (default: the node's
        address when in Ray, else loopback). `internal_token`: the secret the cluster's own services
        require of each other (see cluster/actors/cluster.py); None: they require nothing."""
        KvDirectory.__init__(self, page_size, cache_key)
        HostRegistry.__init__(self)
        self._internal_token = internal_token
        self._targets: dict[str, str] = {}  # worker id -> its handler-call service, host:port
        self._model: dict | None = None  # worker_service.describe() of the first worker
        self._meta_lock = threading.Lock()
        self._bus_address = bus_address
        self._bus: BusServer | None = None

    def join(self, worker_id: str, target: str, num_pages: int, model: dict) -> Reclaimed:
        """A worker (re)starts, empty, serving at `target`. Every worker must run the same model."""
        info = model["info"]
        with self._meta_lock:
            if self._model is not None and self._model["info"]["name"] != info["name"]:
                raise InferletError(f"worker {worker_id!r} runs {info['name']!r}, the cluster runs "
                                    f"{self._model['info']['name']!r}: one model per cluster")
            self._model = self._model or model
            self._targets[worker_id] = target
        return self.register(worker_id, num_pages, info["page_size"])

    def target(self, worker_id: str) -> str:
        """Where the worker serves handler calls (raises WorkerDead / UnknownWorker when it cannot)."""
        with self._lock:
            self._worker(worker_id)  # raises unless known and live
        with self._meta_lock:
            return self._targets[worker_id]

    def worker_lost(self, worker_id: str, target: str) -> Reclaimed:
        """A host lost its connection to the worker at `target`. It is dead unless it has already
        rejoined at another target (a restart the host noticed late)."""
        with self._meta_lock:
            if self._targets.get(worker_id) != target:
                return Reclaimed()
        return self.worker_died(worker_id)

    def host_died(self, host_id: str) -> Reclaimed:
        """The host is gone: it leaves the host table, and its inferlets end (what they owned is dropped)."""
        self.drop_host(host_id)
        return super().host_died(host_id)

    def _hosts_dropped(self, host_ids: list[str]) -> None:
        for host_id in host_ids:
            KvDirectory.host_died(self, host_id)

    def model(self) -> dict:
        with self._meta_lock:
            if self._model is None:
                raise NoLiveWorker("no worker has joined the cluster yet; wait for the workers to load the model")
            return self._model

    def capacity(self) -> dict:
        """The model and the live workers' KV pages (as last reported): HealthReply's fields."""
        live = [w for w in self.workers() if w.live]
        with self._meta_lock:
            model = self._model["info"]["name"] if self._model and live else ""
        return {"model": model, "free_pages": sum(w.free_pages for w in live),
                "total_pages": sum(w.num_pages for w in live), "cached_pages": sum(w.cached_pages for w in live)}

    def bus_target(self) -> str:
        """Where the cluster's message bus serves: one MessageBus for every host's inferlets, run in
        this process (not an actor of its own, whose idle wake-ups every node would pay) and started
        when an inferlet first messages. It restarts, empty, with the directory."""
        with self._meta_lock:
            if self._bus is None:
                self._bus = BusServer(MessageBus(BusLimits(), Timers()), address=self._bus_address or _node_address(),
                                      token=self._internal_token)
            return self._bus.target

    def internal_token(self) -> str | None:
        """The token the workers, hosts and bus of this cluster require of their callers."""
        return self._internal_token


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class DirectoryHandle:
    """Blocking calls to the directory actor: `handle.place(tokens)` instead of ray.get(...remote()).
    An error the directory raises arrives as its own class; an actor that cannot answer (down, or
    restarting beyond Ray's retries) as DirectoryUnavailable."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, method: str):
        import ray

        remote = getattr(self._actor, method).remote

        def call(*args, **kwargs):
            try:
                return ray.get(remote(*args, **kwargs))
            except ray.exceptions.RayTaskError as e:
                raise e.cause if isinstance(e.cause, Exception) else e
            except ray.exceptions.RayError as e:
                raise DirectoryUnavailable(f"the KV-page directory did not answer {method}: {e}; it may be "
                                           f"restarting, retry shortly") from e
        return call
