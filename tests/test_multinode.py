"""Cluster mode over several Ray nodes on this one machine (issue 22): placement across nodes, and a
node lost under load.

tests/multinode_scenario.py runs it all in a process of its own (ray.cluster_utils.Cluster: a head
node and two "GPU" nodes, raylets on loopback, custom resources standing in for GPUs) and prints what
it saw as JSON; these tests judge that. A process of its own, because a driver joins one Ray at a
time and the session's other modules start and stop theirs; it is killed, with every Ray process it
started, if it runs past SCENARIO_TIMEOUT_S (~70-100 s here, on 2 cores). The last test checks, without
Ray, the actor options ClusterSpec.spread asks for.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster.actors.cluster import HEAD_NODE_RESOURCE, ClusterSpec, start_cluster  # noqa: E402
from cluster.actors.directory_actor import Directory  # noqa: E402
from cluster.actors.host_actor import HostActor  # noqa: E402
from cluster.actors.worker_actor import WorkerActor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).with_name("multinode_scenario.py")
SCENARIO_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def seen() -> dict:
    """What the scenario saw (its progress goes to this test's stderr)."""
    # a session of its own: every Ray process it starts is in it (Ray's daemons in its process group, each
    # actor's process in a group of its own), and kill_session ends them all
    process = subprocess.Popen([sys.executable, str(SCENARIO)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_session(process.pid)
        process.communicate()
        pytest.fail(f"the multi-node scenario ran past {SCENARIO_TIMEOUT_S} s (killed; its progress is on stderr)")
    lines = out.strip().splitlines()  # Ray prints its raylets' deaths on the driver's stdout too
    assert process.returncode == 0 and lines, (process.returncode, out[-2000:])
    facts = json.loads(lines[-1])
    print(f"[multinode] seconds: {facts['seconds']}, recovered {facts.get('recovered_s')} s after the loss",
          file=sys.stderr)
    return facts


def kill_session(session_id: int) -> None:
    """SIGKILL every process of the session (the scenario's driver, Ray's daemons, the actors' processes)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        except OSError:
            continue  # it ended meanwhile
        if int(fields[3]) == session_id:
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def no_error(seen: dict) -> None:
    assert "error" not in seen, f"the scenario stopped: {seen['error']}"


def test_workers_and_hosts_spread_over_the_gpu_nodes(seen):
    """ClusterSpec(spread=True) with worker_resources / host_resources naming custom resources: one worker
    and one host on each GPU node, the directory and the driver on the head node; both hosts serve."""
    assert "before" in seen, f"the scenario stopped before the cluster was up: {seen.get('error')}"
    nodes, before = seen["nodes"], seen["before"]
    assert nodes["driver"] == nodes["head"] == before["directory"]
    assert sorted(before["workers"]) == sorted(nodes["gpu"]), "the workers are not one on each GPU node"
    assert sorted(before["hosts"]) == sorted(nodes["gpu"]), "the hosts are not one on each GPU node"
    assert [run["end"] for run in seen["warm"]] == ["finished", "finished"], seen["warm"]
    assert all("Paris" in run["text"] for run in seen["warm"]), seen["warm"]
    assert {run["instance_id"].removeprefix("inferlet-").rsplit("-", 1)[0] for run in seen["warm"]} == \
        set(before["host_ids"]), "the gateway did not place one on each host"


def test_a_lost_node_fails_its_inferlets_only_naming_what_was_lost(seen):
    """Node loss under load (SIGKILL of a GPU node's raylet and everything on it): an inferlet whose host
    was there fails naming the host, one whose worker was there fails naming the worker and its address,
    and the rest run to their last token. The kept worker gets every page back, the directory agrees."""
    no_error(seen)
    runs, lost_targets, config = seen["runs"], seen["lost_targets"], seen["config"]
    assert all(seen["running_at_removal"]), "an inferlet ended before the node was lost"
    kinds = {(run["host_lost"], run["worker_lost"]) for run in runs}  # (host lost, worker lost)
    assert {(True, False), (False, False)} <= kinds, f"placement missed a case: {kinds}"  # the pinned one: (F, T)
    for run in runs:
        if run["host_lost"]:
            assert run["end"] == "failed" and f"the inferlet host {run['host_id']} at" in run["error"], run
        elif run["worker_lost"]:
            worker = run["worker_id"]
            assert run["end"] == "failed" and f"lost the worker {worker} at {lost_targets[worker]}" in run["error"], run
        else:
            assert run["end"] == "finished" and run["messages"] == config["long_tokens"], run
    pinned = seen["pinned"]  # a host on the head node, its inferlet pinned to the lost worker
    worker = pinned["worker_id"]
    assert pinned["end"] == "failed" and f"lost the worker {worker} at {lost_targets[worker]}" in pinned["error"]
    assert "pages_timeout" not in seen, seen["pages_timeout"]
    after = seen["after_loss"]
    assert after["invariants"] == "hold", after
    kept = [f"worker-{i}" for i, node in enumerate(seen["before"]["workers"]) if node == seen["kept_node"]]
    assert kept and all(after["free"][w] == config["num_pages"] for w in kept), after


def test_the_lost_worker_and_host_come_back_on_the_kept_node_and_serve(seen):
    """Ray restarts the lost node's worker and host on the node that is left (it has room for both):
    the worker loads the model again and joins at a new address, the host comes back under a new id, and
    the gateway places new launches on both hosts. Every page is back and every book agrees at the end."""
    no_error(seen)
    kept, config = seen["kept_node"], seen["config"]
    assert seen["recovered_s"] < config["wait_s"]["recovered"]
    after = seen["after"]
    assert after["workers"] == [kept, kept] and after["hosts"] == [kept, kept], after
    lost_hosts = [h for h, node in zip(seen["before"]["host_ids"], seen["before"]["hosts"]) if node != kept]
    assert lost_hosts and not set(lost_hosts) & set(after["host_ids"]), "the lost host kept its id"
    assert [run["end"] for run in seen["again"]] == ["finished", "finished"], seen["again"]
    assert all("Paris" in run["text"] for run in seen["again"]), seen["again"]
    assert set(seen["again_hosts"]) == set(after["host_ids"]), "the restarted host ran nothing"
    assert "pages_timeout_at_end" not in seen, seen["pages_timeout_at_end"]
    at_end = seen["at_end"]
    assert at_end["invariants"] == "hold" and set(at_end["free"].values()) == {config["num_pages"]}, at_end
    assert all(w == {"live": True, "running": 0} for w in at_end["directory"].values()), at_end
    assert seen["idle"] == ["idle", "idle"]


def actor_options(monkeypatch, spec: ClusterSpec) -> dict[type, list[dict]]:
    """The .options() start_cluster(spec) gives each actor class, recorded instead of starting actors (no Ray)."""
    recorded: dict[type, list[dict]] = {}

    class RecordingActorClass:  # ray.remote(cls).options(...).remote(*args, **kwargs)
        def __init__(self, cls):
            self.cls = cls

        def options(self, **options):
            recorded.setdefault(self.cls, []).append(options)
            return self

        def remote(self, *args, **kwargs):
            return None

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "remote", RecordingActorClass)
    start_cluster(spec, wait=False)
    return recorded


def test_spread_asks_ray_to_spread_workers_and_hosts_and_keeps_the_directory_on_the_head(monkeypatch):
    spread = actor_options(monkeypatch, ClusterSpec(workers=2, hosts=2, spread=True, torch_threads=1,
                                                    worker_resources={"resources": {"gpu_slot": 1}},
                                                    host_resources={"resources": {"host_slot": 1}}))
    for options in spread[WorkerActor]:
        assert options["scheduling_strategy"] == "SPREAD" and options["resources"] == {"gpu_slot": 1}
    for options in spread[HostActor]:
        assert options["scheduling_strategy"] == "SPREAD" and options["resources"] == {"host_slot": 1}
    [directory] = spread[Directory]
    assert directory["resources"] == {HEAD_NODE_RESOURCE: 0.001} and "scheduling_strategy" not in directory
    packed = actor_options(monkeypatch, ClusterSpec(workers=2, hosts=2, torch_threads=1))  # the default
    assert not any("scheduling_strategy" in o or "resources" in o for opts in packed.values() for o in opts), packed
