"""Start (or find) cluster mode's actors on Ray, and the gateway service in front of them.

    ray.init(...)                           # or ray.init(address="auto") to join a cluster
    cluster = start_cluster(ClusterSpec(workers=2))
    server = serve_service(cluster.gateway_service(), port=50051)

One directory actor (which also runs the message bus every inferlet shares), `workers` worker
actors (each asks Ray for `worker_resources`: num_gpus=1 on a GPU cluster, nothing on a CPU box)
and `hosts` host actors (`host_resources`), all named and restarted by Ray when they die (on a node
that is left, when theirs is lost); `spread` places them over the nodes. With `max_hosts` above `hosts`
the host pool is elastic: the pool actor (cluster/actors/host_pool.py) adds hosts up to `max_hosts` when
they are busy or full and removes the ones it added once idle for `host_idle_s`. Actors that already exist
under those names are reused (a second gateway, or a Serve replica that restarted, joins the same
cluster). `pie serve --ray` and deploy/app.py both start the cluster through here.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, Directory, DirectoryHandle
from cluster.actors.host_actor import HostActor
from cluster.actors.host_pool import POOL_NAME, HostPool, PoolPolicy
from cluster.actors.worker_actor import WorkerActor
from cluster.worker.batcher import BatchPolicy
from cluster.actors.gateway import GatewayService
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING
from cluster.api.program_store import ProgramStore
from cluster.services.http_client import HttpPolicy
from workers.errors import ModelLoadError
from workers.executors import EXECUTORS, quant_refusal
from workers.torch_executor import QUANTS

log = logging.getLogger("pie.cluster")
WORKER_NAME = "pie-worker-{}"
HOST_NAME = "pie-host-{}"
GROW_WAIT_S = 60.0  # how long a launch that finds every host full waits for the elastic pool's new host
START_ATTEMPTS = 3  # starts of a local Ray (see init_local_ray)
START_TIMEOUTS = ("gcs_server_port", "timed out during startup")  # the start failures worth another try
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives its head node this resource (1 of it), and no other node


@dataclass(frozen=True)
class ClusterSpec:
    workers: int = 2  # worker actors: one per GPU, or CPU workers on a machine without one
    hosts: int = 1  # inferlet host actors (each runs many sandboxes)
    # an elastic host pool: hosts added (one at a time, up to this many) when the hosts are busy or full, and
    # those added removed again once idle for host_idle_s (drained first); never fewer than `hosts`.
    # None (or `hosts`): a fixed pool of `hosts`
    max_hosts: int | None = None
    host_idle_s: float = 30.0
    model: str | None = None  # a .gguf file, a model directory or a hub id (default: SmolLM2)
    dtype: str = "bf16"
    quant: str = "none"  # the linear layers' weights: none, or int8 / int4 weight-only quantized (CPU kernels)
    executor: str = "torch"  # the workers' model code: torch (ours) or vllm (vLLM's; needs the vllm install)
    device: str = "cpu"  # "cuda" on GPU workers
    num_pages: int | None = None  # KV pages per worker (default: the executor's budget)
    page_size: int = 16
    torch_threads: int | None = None  # per CPU worker (default: the node's cores shared among its workers)
    policy: BatchPolicy = BatchPolicy()
    worker_resources: dict = field(default_factory=dict)  # e.g. {"num_gpus": 1}; {} asks Ray for nothing
    host_resources: dict = field(default_factory=dict)  # e.g. {"resources": {"host_slot": 1}}: where hosts may run
    # several nodes: Ray places the workers on as many nodes as it can, and the hosts likewise (its "SPREAD"
    # strategy, best effort), and the directory on the head node, which the cluster cannot lose anyway (Ray's GCS
    # runs there). False: Ray's default (pack each node before the next)
    spread: bool = False
    # the actors outlive the process that started them (Ray ends an actor with its owner otherwise): a Serve
    # replica, which may die while the cluster serves on. They then run until `ray stop` or ray.kill
    detached: bool = False
    max_running: int = DEFAULT_MAX_RUNNING  # per host, and at the gateway
    # where workers and hosts listen: None = each node's address (multi-node); "127.0.0.1" on one machine.
    # Their services require the cluster's internal token of each other (below); keep them on a private
    # network all the same: the token travels in clear text
    bind_address: str | None = None
    # the secret the workers, hosts and message bus require of their callers (gRPC metadata `authorization:
    # Bearer ...`). None: a random one. The directory keeps the token it was created with: a later
    # start_cluster that finds the running actors uses theirs, whatever this says
    internal_token: str | None = None
    # inferlets' outbound HTTP on every host: the allow-list ("host" or "host:port"; empty: no HTTP), the pool
    http_policy: HttpPolicy = HttpPolicy()

    def __post_init__(self):
        # checked here, before any actor starts: a worker that raised it would be restarted by Ray forever
        if self.quant not in QUANTS:
            raise ValueError(f"ClusterSpec.quant must be one of {list(QUANTS)}, not {self.quant!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"ClusterSpec.executor must be one of {list(EXECUTORS)}, not {self.executor!r}")
        why = quant_refusal(self.executor, self.quant)
        if why:
            raise ValueError(f"ClusterSpec.quant {self.quant!r} {why}")
        if self.max_hosts is not None and (not isinstance(self.max_hosts, int) or self.max_hosts < self.hosts):
            raise ValueError(f"ClusterSpec.max_hosts must be an int of at least hosts ({self.hosts}), or None for "
                             f"a fixed pool, not {self.max_hosts!r}")
        if self.elastic and self.hosts < 1:
            raise ValueError(f"ClusterSpec.hosts must be at least 1 for an elastic pool (max_hosts), not {self.hosts}")
        if not self.host_idle_s > 0:
            raise ValueError(f"ClusterSpec.host_idle_s must be positive seconds, not {self.host_idle_s!r}")

    @property
    def elastic(self) -> bool:
        """Whether the host pool grows and shrinks (max_hosts above hosts)."""
        return self.max_hosts is not None and self.max_hosts > self.hosts

    @property
    def gateway_max_running(self) -> int:
        """Inferlets running at once through one gateway: max_running per host, of max_hosts when elastic."""
        return self.max_running * (self.max_hosts if self.elastic else 1)

    def pool_policy(self) -> PoolPolicy:
        return PoolPolicy(min_hosts=self.hosts, max_hosts=self.max_hosts or self.hosts, idle_s=self.host_idle_s)


class Cluster:
    """Handles to the started actors."""

    def __init__(self, spec: ClusterSpec, directory, workers: list, hosts: list, pool=None):
        self.spec = spec
        self.directory_actor = directory
        self.directory = DirectoryHandle(directory)
        self.workers = workers  # worker actor handles, in worker-id order
        self.hosts = hosts  # the host actor handles start_cluster made (the elastic pool's are in the directory)
        self.pool = pool  # the elastic pool's actor (HostPool), None for a fixed pool

    @property
    def internal_token(self) -> str | None:
        """The token the cluster's own services require of each other (the directory keeps it)."""
        return self.directory.internal_token()

    def gateway_service(self, store: ProgramStore | None = None) -> GatewayService:
        """A gateway over this cluster: as many as wanted, each keeping no state of its own. Over an elastic
        pool a launch that finds every host full waits for the pool's new host (up to GROW_WAIT_S), and the
        gateway runs up to max_running inferlets per host of max_hosts."""
        elastic = self.spec.elastic
        service = GatewayService(self.directory, store or ProgramStore(), self.spec.gateway_max_running,
                                 internal_token=self.internal_token,
                                 wait_for_host=self._wait_for_host if elastic else None)
        service.cluster = self  # Ray ends actors whose handles are all gone (named or not): the gateway keeps them
        return service

    def drain_worker(self, worker_id: str):
        """Empty `worker_id` before it is removed: every host's running inferlets move off it (between
        their steps), then its exports (kv_migration.Drained: what moved, and what stayed with why)."""
        import ray

        named = [ray.get_actor(h.actor_name, namespace=NAMESPACE) for h in self.directory.hosts() if h.actor_name]
        hosts = named or self.hosts
        moved = ray.get([h.move_inferlets_off.remote(worker_id) for h in hosts])
        drained = ray.get(hosts[0].drain_worker.remote(worker_id))  # its inferlets are off already: the exports
        return dataclasses.replace(drained, inferlets=tuple(m for per_host in moved for m in per_host) + drained.inferlets)

    def _wait_for_host(self) -> bool:
        """The gateway's wait when every host is full: the pool's grow (True once there is a place)."""
        import ray

        try:
            pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
            return ray.get(pool.grow.remote(GROW_WAIT_S), timeout=GROW_WAIT_S + 30)
        except (ValueError, ray.exceptions.RayError) as e:  # no pool actor, or it is down
            log.warning("every host is full and the host pool does not answer: %r", e)
            return False

    def wait_for_workers(self, count: int | None = None, timeout_s: float = 600.0) -> None:
        """Block until `count` (default: all) workers are live in the directory, printing progress.
        Raises ModelLoadError as soon as a worker reports that it cannot load the model."""
        import ray

        count = len(self.workers) if count is None else count
        deadline = time.monotonic() + timeout_s
        failures = [w.load_failure.remote() for w in self.workers]  # answered once each has loaded, or not
        while (live := sum(w.live for w in self.directory.workers())) < count:
            ready, _ = ray.wait(failures, num_returns=len(failures), timeout=0)
            for ref in ready:
                i = failures.index(ref)
                try:
                    error = ray.get(ref)
                except ray.exceptions.RayActorError:  # it died while loading: Ray restarts it, ask again
                    failures[i] = self.workers[i].load_failure.remote()
                    continue
                if error:
                    raise ModelLoadError(f"worker {i} cannot load the model: {error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {live} of {count} workers joined within {timeout_s:.0f} s; "
                                   f"see the worker actors' logs (ray logs, or the driver's output)")
            print(f"[cluster] waiting for workers to load the model: {live}/{count} ready", file=sys.stderr,
                  flush=True)
            time.sleep(1.0)


def init_local_ray(**options) -> None:
    """Start a Ray of our own on loopback (never one a stale /tmp/ray/ray_current_cluster points at),
    with its workers at normal priority: Ray runs them at nice 15 by default, and a niced executor
    loses every core it shares with the gateway or Ray's own daemons (1.1-1.2x the time per token
    here, see docs/benchmarks.md). Set RAY_worker_niceness=0 likewise for `ray start` on a cluster."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(**{"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False, **options})
            return
        except Exception as e:
            # seen here when Ray is started right after another local Ray stopped: its GCS server never
            # writes its port file (ray._raylet.wait_for_persisted_port times out), or the node times out
            # waiting for its raylet; another start has worked each time
            if not any(sign in str(e) for sign in START_TIMEOUTS) or attempt == START_ATTEMPTS:
                raise
            print(f"[ray] starting a local Ray failed ({e}); trying again ({attempt + 1}/{START_ATTEMPTS})",
                  file=sys.stderr, flush=True)
            ray.shutdown()
            time.sleep(2.0)


def start_cluster(spec: ClusterSpec = ClusterSpec(), wait: bool = True) -> Cluster:
    """Create the actors (or reuse those of the same names) in the current Ray session."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("start Ray first: ray.init() (a local cluster) or ray.init(address='auto')")
    threads = spec.torch_threads or max(1, (os.cpu_count() or 1) // max(1, spec.workers))
    lifetime = {"lifetime": "detached"} if spec.detached else {}
    placement = {"scheduling_strategy": "SPREAD", **lifetime} if spec.spread else lifetime  # workers and hosts
    on_head = {"resources": {HEAD_NODE_RESOURCE: 0.001}, **lifetime} if spec.spread else lifetime
    directory = ray.remote(Directory).options(
        name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1,  # a call made while it restarts waits for it instead of failing
        **on_head,
    ).remote(spec.page_size, bus_address=spec.bind_address,
              internal_token=spec.internal_token or secrets.token_urlsafe(24))
    # Ray starts actors with OMP_NUM_THREADS=1 (num_cpus of the actor) and at nice 15; torch.set_num_threads
    # alone leaves threads that read the environment at one, and a niced executor loses every core it shares
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    workers = [ray.remote(WorkerActor).options(
        name=WORKER_NAME.format(i), namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
        num_cpus=0, max_concurrency=8, runtime_env={"env_vars": threads_env}, **{**placement, **spec.worker_resources},
    ).remote(f"worker-{i}", DIRECTORY_NAME, model=spec.model, dtype=spec.dtype, quant=spec.quant,
              executor=spec.executor, num_pages=spec.num_pages, torch_threads=threads, policy=spec.policy,
              device=spec.device, address=spec.bind_address)
        for i in range(spec.workers)]
    hosts = [start_host(spec, i, placement) for i in range(spec.hosts)]
    pool = None
    if spec.elastic:  # its new hosts get the same options as these
        pool = ray.remote(HostPool).options(
            name=POOL_NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
            max_concurrency=64,  # launches waiting in grow(), beside the pool's own loop
            **on_head,
        ).remote(spec.pool_policy(), functools.partial(start_host, spec, placement=placement), HOST_NAME)
    cluster = Cluster(spec, directory, workers, hosts, pool)
    if wait:
        cluster.wait_for_workers()
    return cluster


def start_host(spec: ClusterSpec, index: int, placement: dict):
    """Create (or find) the host actor HOST_NAME.format(index): start_cluster's hosts, and those the elastic
    pool adds. `placement`: the options start_cluster gives workers and hosts alike (spread, lifetime)."""
    import ray

    return ray.remote(HostActor).options(
        name=HOST_NAME.format(index), namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
        num_cpus=0, max_concurrency=8, **{**placement, **spec.host_resources},
    ).remote(DIRECTORY_NAME, max_running=spec.max_running, address=spec.bind_address, http_policy=spec.http_policy)
