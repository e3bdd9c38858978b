"""The elastic inferlet host pool (cluster/actors/host_pool.py).

Its decisions are `plan()`, a pure function of the directory's host table, the time and the policy:
tested here without Ray. `HostPool.grow` runs over an in-process Directory with a fake host start. The
last test starts a local Ray cluster (one worker, one host, up to three) and serves a burst through the
gateway: the pool grows to three hosts, every launch waits for its place instead of being refused, and
once idle the pool drains and removes the hosts it added.
"""
from __future__ import annotations

import threading
import time

import pytest

from cluster.actors.directory_actor import Directory
from cluster.actors.host_pool import HostPool, PoolPolicy, free_places, host_index, plan
from cluster.actors.host_registry import HOST_STALE_S, HostLoad
from helpers import wait_until

POLICY = PoolPolicy(min_hosts=1, max_hosts=3, grow_at=0.75, idle_s=30.0)


def host(index: int, running: int = 0, picked: int = 0, max_running: int = 4, draining: bool = False,
         silent_s: float = 0.0, name: str | None = None) -> HostLoad:
    return HostLoad(f"h{index}", f"127.0.0.1:{9000 + index}", f"pie-host-{index}" if name is None else name,
                    max_running, running, picked, draining, silent_s)


def test_host_index_reads_the_actor_names_number():
    assert host_index("pie-host-0") == 0 and host_index("pie-host-12") == 12
    assert host_index("") is None and host_index("gateway") is None


def test_grows_when_the_busy_fraction_reaches_grow_at():
    assert plan([host(0, running=2, picked=1)], 0.0, {}, POLICY).start  # 3 of 4
    assert not plan([host(0, running=2)], 0.0, {}, POLICY).acts  # 2 of 4
    both = [host(0, running=4), host(1, running=2)]  # 6 of 8
    step = plan(both, 0.0, {}, POLICY)
    assert step.start and "6 of 8 places busy" in step.why and "2 of at most 3 hosts" in step.why


def test_grows_when_more_launches_wait_than_places_are_free():
    assert plan([host(0, running=1)], 0.0, {}, POLICY, waiting=4).start  # 3 free
    assert not plan([host(0, running=1)], 0.0, {}, POLICY, waiting=3).acts


def test_never_grows_beyond_max_hosts():
    full = [host(i, running=4) for i in range(3)]
    step = plan(full, 0.0, {}, POLICY, waiting=5)
    assert not step.acts and "at max_hosts 3" in step.why


def test_a_draining_host_goes_back_to_work_before_a_new_one_starts():
    hosts = [host(0, running=4), host(1, running=1, draining=True), host(2, draining=True)]
    step = plan(hosts, 0.0, {}, POLICY)
    assert step.undrain == "h1" and not step.start and not step.remove  # the busier one; nothing removed now


def test_stale_and_non_actor_hosts_count_for_nothing():
    silent = host(1, silent_s=HOST_STALE_S)
    assert plan([host(0, running=3), silent], 0.0, {}, POLICY).start  # the silent host's places do not count
    assert free_places([host(0, running=1), silent, host(2, draining=True)]) == 3
    assert not plan([host(0, name="", running=4)], 0.0, {}, POLICY).acts  # not an actor: not the pool's


def test_idle_time_is_tracked_from_plan_to_plan():
    step = plan([host(0), host(1, running=1), host(2, picked=1)], 5.0, {"h0": 1.0, "h1": 1.0}, POLICY)
    assert step.idle_since == {"h0": 1.0}  # busy (or picked for) resets it
    assert plan([host(0), host(1)], 7.0, step.idle_since, POLICY).idle_since == {"h0": 1.0, "h1": 7.0}


def test_shrinks_the_newest_host_idle_for_idle_s_and_never_the_clusters_own():
    hosts = [host(0), host(1), host(2)]
    assert not plan(hosts, 29.0, {"h0": 0.0, "h1": 0.0, "h2": 0.0}, POLICY).acts  # not idle long enough yet
    step = plan(hosts, 30.0, {"h0": 0.0, "h1": 0.0, "h2": 0.0}, POLICY)
    assert step.drain == "h2" and "idle for 30 s" in step.why
    assert not plan([host(0), host(1, running=1)], 100.0, {"h0": 0.0}, POLICY).acts  # host 0 is the cluster's own
    two_own = PoolPolicy(min_hosts=2, max_hosts=3, idle_s=30.0)
    assert plan(hosts, 100.0, {"h0": 0.0, "h1": 0.0, "h2": 0.0}, two_own).drain == "h2"
    assert not plan(hosts[:2], 100.0, {"h0": 0.0, "h1": 0.0}, two_own).acts


def test_does_not_shrink_when_the_rest_would_be_busy_enough_to_grow_again():
    idle = {"h1": 0.0}
    assert not plan([host(0, running=3), host(1)], 100.0, idle, POLICY).acts  # 3 of 4 left: at grow_at
    assert plan([host(0, running=2), host(1)], 100.0, idle, POLICY).drain == "h1"  # 2 of 4 left


def test_a_draining_host_is_removed_once_empty_and_waits_while_busy():
    empty, busy, raced = host(1, draining=True), host(2, running=1, draining=True), host(3, picked=1, draining=True)
    step = plan([host(0), empty, busy, raced], 0.0, {}, POLICY)
    assert step.remove == ("h1",) and not step.drain and not step.start
    operator_drained = host(0, draining=True)  # the cluster's own host: drained by someone else, left alone
    assert not plan([operator_drained, host(1, running=1)], 0.0, {}, POLICY).remove


def test_the_policy_and_the_spec_refuse_bad_bounds():
    from cluster.actors.cluster import ClusterSpec

    with pytest.raises(ValueError, match="1 <= min_hosts <= max_hosts"):
        PoolPolicy(min_hosts=3, max_hosts=2)
    with pytest.raises(ValueError, match="grow_at"):
        PoolPolicy(grow_at=0.0)
    with pytest.raises(ValueError, match=r"ClusterSpec.max_hosts must be an int of at least hosts \(2\)"):
        ClusterSpec(hosts=2, max_hosts=1)
    with pytest.raises(ValueError, match="ClusterSpec.host_idle_s must be positive"):
        ClusterSpec(max_hosts=2, host_idle_s=0)
    assert not ClusterSpec(hosts=2).elastic and not ClusterSpec(hosts=2, max_hosts=2).elastic
    spec = ClusterSpec(hosts=2, max_hosts=5, host_idle_s=4.0)
    assert spec.elastic and spec.pool_policy() == PoolPolicy(min_hosts=2, max_hosts=5, idle_s=4.0)


def test_start_cluster_starts_the_pool_only_when_elastic_and_its_hosts_like_the_first(monkeypatch):
    """Recorded instead of started (no Ray): the pool actor and its start_host, whose hosts get the options
    and arguments start_cluster gives its own (spread, host_resources), under fresh names."""
    ray = pytest.importorskip("ray")
    from cluster.actors.cluster import ClusterSpec, start_cluster
    from cluster.actors.host_actor import HostActor

    started = []  # (class, options, args, kwargs)

    class RecordingActorClass:  # ray.remote(cls).options(...).remote(*args, **kwargs)
        def __init__(self, cls):
            self.cls, self.options_ = cls, {}

        def options(self, **options):
            self.options_ = options
            return self

        def remote(self, *args, **kwargs):
            started.append((self.cls, self.options_, args, kwargs))

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "remote", RecordingActorClass)
    start_cluster(ClusterSpec(workers=1, hosts=2, torch_threads=1), wait=False)
    assert HostPool not in [cls for cls, *_ in started]  # a fixed pool
    started.clear()
    spec = ClusterSpec(workers=1, hosts=2, max_hosts=4, host_idle_s=5.0, spread=True, torch_threads=1,
                       host_resources={"resources": {"host_slot": 1}})
    start_cluster(spec, wait=False)
    [(_, options, (policy, start_host, host_name), _)] = [s for s in started if s[0] is HostPool]
    assert options["name"] == "pie-host-pool" and options["num_cpus"] == 0 and options["max_restarts"] == -1
    assert policy == PoolPolicy(min_hosts=2, max_hosts=4, idle_s=5.0) and host_name == "pie-host-{}"
    first = [s for s in started if s[0] is HostActor]
    start_host(7)
    *_, added = [s for s in started if s[0] is HostActor]
    assert added[1] == {**first[0][1], "name": "pie-host-7"} and added[2:] == first[0][2:]
    assert added[1]["scheduling_strategy"] == "SPREAD" and added[1]["resources"] == {"host_slot": 1}


class FakeHosts:
    """start_host for a pool over an in-process Directory: the 'host' reports at once."""

    def __init__(self, directory: Directory, max_running: int = 2):
        self.directory, self.max_running, self.started = directory, max_running, []
        self._ids = iter(range(1_000_000))

    def __call__(self, index: int):
        self.started.append(index)
        self.directory.host_alive(f"new{index}", f"127.0.0.1:{9100 + index}", self.max_running, f"pie-host-{index}")
        return None

    def fill(self, host_id: str, count: int) -> None:
        for _ in range(count):
            self.directory.instance_started(f"inferlet-{host_id}-{next(self._ids)}", host_id, "program", "digest")


@pytest.fixture
def pool_over_a_directory():
    directory = Directory(page_size=16)
    hosts = FakeHosts(directory)
    directory.host_alive("first", "127.0.0.1:9000", 2, "pie-host-0")
    pool = HostPool(PoolPolicy(min_hosts=1, max_hosts=2, idle_s=600.0, tick_s=0.05), hosts, directory=directory)
    yield pool, directory, hosts
    pool.stop()


def test_grow_starts_a_host_and_grants_each_waiting_launch_its_own_place(pool_over_a_directory):
    pool, directory, hosts = pool_over_a_directory
    hosts.fill("first", 1)  # 1 of 2 busy: below grow_at
    time.sleep(0.2)
    assert hosts.started == []
    results = []
    callers = [threading.Thread(target=lambda: results.append(pool.grow(5.0))) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    # the first host had one place; the pool started pie-host-1 (2 more): three launches, three places
    assert results == [True, True, True] and hosts.started == [1]
    assert [h.actor_name for h in directory.hosts()] == ["pie-host-0", "pie-host-1"]
    hosts.fill("first", 1)
    hosts.fill("new1", 2)
    assert pool.grow(5.0) is False  # every host full at max_hosts: no place will come
    assert hosts.started == [1]


def test_a_burst_grows_the_pool_to_max_hosts_then_it_shrinks_back_when_idle():
    """Through the gateway: a burst of long inferlets on one host of 2 places grows the pool to 3 hosts, one
    at a time; none is refused (each launch waits for its host); once they end and idle_s passes, the pool
    drains and removes the two it added, whose actors are gone, and every KV page comes back."""
    ray = pytest.importorskip("ray")

    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster
    from cluster.actors.directory_actor import NAMESPACE
    from cluster.api.grpc_client import Finished, Message, PieClient, Started
    from cluster.api.grpc_server import serve_service
    from cluster.runtime.inferlet_build import build

    init_local_ray(num_cpus=2, log_to_driver=False)
    server, watcher, watching = None, None, threading.Event()
    try:
        spec = ClusterSpec(workers=1, hosts=1, max_hosts=3, host_idle_s=2.0, max_running=2, num_pages=NUM_PAGES,
                           torch_threads=1, bind_address="127.0.0.1", dtype="fp32")
        cluster = start_cluster(spec)
        server = serve_service(cluster.gateway_service(), port=0)
        seen: set[str] = set()  # actor names of the hosts seen in the directory

        def watch():
            while not watching.is_set():
                seen.update(h.actor_name for h in cluster.directory.hosts())
                time.sleep(0.1)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with PieClient(server.target) as client:
            program = client.upload(build("inferlets/examples/text_completion.py"))
            results = [None] * BURST

            def run(i):
                events = list(client.launch(program, ["--prompt", f"Tell me story number {i}.", "--max-tokens",
                                                      str(BURST_TOKENS), "--ignore-eos"]))
                results[i] = (events[0].instance_id if isinstance(events[0], Started) else None,
                              sum(isinstance(e, Message) for e in events), events[-1])
            t0 = time.monotonic()
            runs = [threading.Thread(target=run, args=(i,)) for i in range(BURST)]
            for t in runs:
                t.start()
            for t in runs:
                t.join(120)
            burst_s = time.monotonic() - t0
        assert all(r is not None and isinstance(r[2], Finished) for r in results), results
        assert seen >= {"pie-host-0", "pie-host-1", "pie-host-2"} and "pie-host-3" not in seen, seen
        ran_on = {r[0].removeprefix("inferlet-").rsplit("-", 1)[0] for r in results}
        assert len(ran_on) == 3, f"the burst ran on {len(ran_on)} hosts"
        t1 = time.monotonic()
        wait_until(lambda: [h.actor_name for h in cluster.directory.hosts()] == ["pie-host-0"], 60,
                   "the pool to shrink back to pie-host-0")
        shrink_s = time.monotonic() - t1
        watching.set()
        for name in ("pie-host-1", "pie-host-2"):
            wait_until(lambda: _gone(ray, name, NAMESPACE), 30, f"{name}'s actor to be gone")
        status = ray.get(cluster.pool.status.remote())
        assert status.hosts == ("pie-host-0",) and status.started == 2 and status.removed == 2, status
        wait_until(lambda: ray.get(cluster.workers[0].free_pages.remote()) == NUM_PAGES, 30,
                   "every KV page to come back")
        ray.get(cluster.workers[0].check_idle.remote())
        cluster.directory.check_invariants()
        assert all(w.running == 0 for w in cluster.directory.workers())
        print(f"burst of {BURST} in {burst_s:.1f} s on {len(ran_on)} hosts; shrunk back in {shrink_s:.1f} s")
    finally:
        watching.set()
        if watcher is not None:
            watcher.join(10)
        if server is not None:
            server.stop(0)
        ray.shutdown()


NUM_PAGES = 96
BURST = 6  # 3 hosts x max_running 2
BURST_TOKENS = 60


def _gone(ray, name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return False
    except ValueError:
        return True
