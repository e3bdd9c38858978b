"""The cluster a cluster-level benchmark runs on, and how it measures the processes in it: the directory
actor counting every call it answers (CountingDirectory), each process's CPU (CpuMeter), gateway
replicas in processes of their own (GatewayProcess), and the cluster itself (`start`, BenchCluster,
`end_cluster_actors`). cluster.bench.capacity and cluster.bench.scale both run on it.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, Directory
from cluster.api.grpc_server import serve_service

ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# -- the directory, counting what it answers ---------------------------------------------------------------
class CountingDirectory(Directory):
    """The directory with every call from outside counted and timed (its own time, inside the actor:
    Ray's share of a call is not in it). `call_stats()` reads the counts; the methods are wrapped below."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._call_stats: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])  # method -> [calls, s]
        self._call_stats_lock = threading.Lock()
        self._call_depth = threading.local()  # its calls to its own methods are not counted again

    def call_stats(self) -> dict[str, tuple[int, float]]:
        """method -> (calls answered, seconds spent in them) since the actor started."""
        with self._call_stats_lock:
            return {name: (n, s) for name, (n, s) in self._call_stats.items()}

    def pid(self) -> int:
        return os.getpid()


def _counted(name: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        depth = getattr(self._call_depth, "n", 0)
        self._call_depth.n = depth + 1
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._call_depth.n = depth
            if depth == 0:
                spent = time.perf_counter() - t0
                with self._call_stats_lock:
                    stats = self._call_stats[name]
                    stats[0] += 1
                    stats[1] += spent
    return call


for _name in dir(Directory):
    if not _name.startswith("_") and callable(getattr(Directory, _name)):
        setattr(CountingDirectory, _name, _counted(_name, getattr(Directory, _name)))


def start_counting_directory(page_size: int = 16, bind_address: str = "127.0.0.1") -> object:
    """The directory actor under its usual name and options, created before start_cluster (which then
    finds it: get_if_exists) so that the cluster runs on it."""
    import secrets

    import ray

    return ray.remote(CountingDirectory).options(
        name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1,
    ).remote(page_size, bus_address=bind_address, internal_token=secrets.token_urlsafe(24))


def stats_delta(after: dict, before: dict) -> dict[str, tuple[int, float]]:
    """call_stats() differences, methods with calls only."""
    delta = {name: (n - before.get(name, (0, 0.0))[0], s - before.get(name, (0, 0.0))[1])
             for name, (n, s) in after.items()}
    return {name: v for name, v in sorted(delta.items()) if v[0] > 0}


# -- CPU by process --------------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICK


class CpuMeter:
    """Each named process's CPU seconds, and the machine's, between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> "CpuMeter":
        self._t0 = time.perf_counter()
        self._before = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy_s()
        return self

    def stop(self) -> dict[str, float]:
        """name -> CPU seconds, plus "machine" (all processes, Ray's daemons included) and "wall"."""
        spent = {name: process_cpu_s(pid) - self._before[name] for name, pid in self.pids.items()}
        spent["machine"] = machine_busy_s() - self._machine
        spent["wall"] = time.perf_counter() - self._t0
        return spent


# -- a gateway in a process of its own -----------------------------------------------------------------------
_GATEWAY_MAIN = "import sys; from cluster.bench.cluster_harness import gateway_main; gateway_main(sys.argv[1:])"


def gateway_main(argv: list[str]) -> None:
    """A gateway replica without Serve: joins the Ray at argv[0] as a driver on its node (address argv[1]),
    finds the cluster's actors with the ClusterSpec fields of argv[2] (JSON), serves the client API on
    loopback, prints its target, and stops when its stdin closes."""
    import ray

    from cluster.actors.cluster import ClusterSpec, start_cluster

    ray.init(address=argv[0], _node_ip_address=argv[1], log_to_driver=False)
    cluster = start_cluster(ClusterSpec(**json.loads(argv[2])), wait=False)
    server = serve_service(cluster.gateway_service(), port=0)
    print(server.target, flush=True)
    sys.stdin.read()
    server.stop(0)
    ray.shutdown()


class GatewayProcess:
    """`gateway_main` in a child process (what a Serve replica is, less Serve's proxy): its own
    interpreter, its own GIL, its CPU measured apart from the client's. `GatewayProcess.start(n, ...)`
    starts n at once (each takes seconds: an interpreter, Ray's driver, the imports)."""

    def __init__(self, spec_fields: dict):
        import ray

        self.proc = subprocess.Popen([sys.executable, "-c", _GATEWAY_MAIN, ray.get_runtime_context().gcs_address,
                                      ray.util.get_node_ip_address(), json.dumps(spec_fields)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.pid = self.proc.pid
        self.target = ""

    @classmethod
    def start(cls, count: int, spec_fields: dict) -> list["GatewayProcess"]:
        gateways = [cls(spec_fields) for _ in range(count)]
        try:
            for g in gateways:
                g.target = g.proc.stdout.readline().strip()
                if not g.target:
                    raise RuntimeError(f"a gateway process exited ({g.proc.wait()}) before serving")
        except BaseException:
            for g in gateways:
                g.stop()
            raise
        return gateways

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the cluster -----------------------------------------------------------------------------------------------
@dataclass
class BenchCluster:
    """A cluster a benchmark started on the counting directory, and how to end it."""

    cluster: object  # cluster.actors.cluster.Cluster
    directory_actor: object  # the CountingDirectory actor
    fields: dict  # its ClusterSpec's fields (GatewayProcess starts its gateways with them)
    pids: dict[str, int]  # directory, host-i, worker-i -> process id
    own_ray: bool  # this benchmark started the Ray it runs on

    def ready(self) -> "BenchCluster":
        """Wait for the workers to load the model, then note every actor's process id."""
        import ray

        self.cluster.wait_for_workers()
        self.pids = {"directory": ray.get(self.directory_actor.pid.remote())}
        self.pids |= {f"host-{i}": ray.get(h.pid.remote()) for i, h in enumerate(self.cluster.hosts)}
        self.pids |= {f"worker-{i}": ray.get(w.pid.remote()) for i, w in enumerate(self.cluster.workers)}
        return self

    def close(self) -> None:
        """Stop the Ray the benchmark started; in a Ray of the caller's (tests), end the cluster's actors."""
        import ray

        if self.own_ray:
            ray.shutdown()
        else:
            end_cluster_actors(self.cluster)


def start(workers: int, hosts: int = 1, dtype: str = "bf16", wait: bool = True, **spec_extra) -> BenchCluster:
    """A cluster on the counting directory, on a local Ray of its own, or on the caller's if one is up.
    `wait=False`: return before the workers have loaded the model (call `ready()` before measuring)."""
    import ray

    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster

    own_ray = not ray.is_initialized()
    if own_ray:
        init_local_ray(log_to_driver=False)
    directory_actor = start_counting_directory()
    fields = {"workers": workers, "hosts": hosts, "dtype": dtype, "bind_address": "127.0.0.1",
              "torch_threads": max(1, (os.cpu_count() or 1) // workers)} | spec_extra
    bench = BenchCluster(start_cluster(ClusterSpec(**fields), wait=False), directory_actor, fields, {}, own_ray)
    return bench.ready() if wait else bench


def end_cluster_actors(cluster, timeout_s: float = 60.0) -> None:
    """Kill the cluster's named actors (its elastic pool first, then hosts, workers, the directory) and wait
    until their names are free, so that another cluster can start in the same Ray."""
    import ray

    from cluster.actors.cluster import HOST_NAME, WORKER_NAME
    from cluster.actors.host_pool import POOL_NAME

    spec = cluster.spec
    hosts = {h.actor_name for h in cluster.directory.hosts() if h.actor_name}
    hosts |= {HOST_NAME.format(i) for i in range(max(spec.hosts, spec.max_hosts or 0))}
    names = [POOL_NAME, *sorted(hosts), *(WORKER_NAME.format(i) for i in range(spec.workers)), DIRECTORY_NAME]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # none by that name
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {name} still exists {timeout_s:.0f} s after ray.kill")
            time.sleep(0.1)
