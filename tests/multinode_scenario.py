"""Cluster mode over three Ray nodes on one machine, one of which is lost under load.

    python tests/multinode_scenario.py     # progress on stderr, one JSON object (what it saw) on stdout

tests/test_multinode.py runs it in a process of its own: the test session's other modules start and
stop an in-process Ray of their own, and a driver belongs to one Ray at a time. It asserts nothing
itself; it records what happened (placement, each inferlet's end, pages, recovery) and the test
judges. A step that waits does so for a bounded time; one that fails records its traceback under
"error" and the scenario ends there, with what it saw so far.

ray.cluster_utils.Cluster starts the nodes as raylets of their own on loopback: a head node (the
driver, the gateway and the directory; no room for workers or hosts) and two "GPU" nodes, each with
room for two workers and two hosts (the custom resources gpu_slot and host_slot stand in for GPUs).
The cluster spreads its two workers and two hosts over the GPU nodes, runs long inferlets, and
one GPU node is killed (SIGKILL, as a machine that is gone): its worker's and its host's inferlets
fail, the rest finish, and Ray brings the lost worker and host back on the other node.
"""
import os

# before Ray is imported (it reads this once): ray.init(address="127.0.0.1:port") replaces a loopback
# address by what it takes for this machine's reachable one (the default route's interface; a GCS on
# loopback is not there, and the driver retries "Failed to get cluster ID from GCS server" forever).
# With Ray's multi-machine switch off, get_node_ip_address answers 127.0.0.1; nothing else reads it but
# `ray start`. All the nodes run here, on loopback, so nothing is lost
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_worker_niceness", "0")  # as init_local_ray: a niced worker loses every shared core

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import ray  # noqa: E402
from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from cluster.actors.cluster import ClusterSpec, start_cluster  # noqa: E402
from cluster.actors.cluster_host import ClusterHost  # noqa: E402
from cluster.actors.worker_actor import LOAD_REPORT_S  # noqa: E402
from cluster.api.grpc_client import Failed, Finished, Message, PieClient, Started  # noqa: E402
from cluster.api.grpc_server import serve_service  # noqa: E402
from cluster.runtime.inferlet_build import build  # noqa: E402

LOOPBACK = "127.0.0.1"
TEXT = "inferlets/examples/text_completion.py"
NUM_PAGES = 96  # per worker
MIN_GATEWAY_RUNS, MAX_GATEWAY_RUNS = 4, 6  # inferlets launched through the gateway before the node goes
LONG_TOKENS = 240  # theirs: long enough to be running when it goes
PINNED_TOKENS = 400
# ~200 tokens: 13 pages on the pinned worker before it generates (the gateway's prompts take 2). At most 3 of the
# gateway's inferlets share that worker with it: 13 + 25 + 3 x 17 pages of the 96
LONG_PROMPT = "Summarize these notes in one paragraph. " + " ".join(
    f"Note {i}: the weekly meeting moved to room {100 + i}." for i in range(16))
# the GCS takes a node whose raylet stopped answering for dead after period x threshold (Ray's defaults:
# 3 s x 5); only then does it restart the node's actors elsewhere
FAST_NODE_FAILURE = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                     "health_check_failure_threshold": 4}
WAIT_S = {"inferlets running": 120, "inferlets ended": 180, "pages back": 60, "recovered": 150}

_t0 = time.monotonic()


def progress(text: str) -> None:
    print(f"[multinode {time.monotonic() - _t0:6.1f}s] {text}", file=sys.stderr, flush=True)


def wait_for(condition, what: str, poll_s: float = 0.25) -> float:
    """Poll condition() until it holds; its seconds. TimeoutError after WAIT_S[what]."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > WAIT_S[what]:
            raise TimeoutError(f"{what}: not within {WAIT_S[what]} s")
        time.sleep(poll_s)
    return time.monotonic() - start


def answer(method, *args, timeout_s: float = 10.0):
    """An actor method's answer, or None while the actor is down or restarting."""
    try:
        return ray.get(method.remote(*args), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        return None


class Run:
    """One launched inferlet, its events collected on a thread of its own."""

    def __init__(self, client: PieClient, program: str, arguments: list[str]):
        self.instance_id: str | None = None
        self.messages: list[str] = []
        self.end: object = None  # Finished, Failed, or the exception the stream raised
        self.ended_at: float | None = None
        self.first_message = threading.Event()
        self._stream = client.launch(program, arguments)
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        try:
            for event in self._stream:
                if isinstance(event, Started):
                    self.instance_id = event.instance_id
                elif isinstance(event, Message):
                    self.messages.append(event.text)
                    self.first_message.set()
                elif isinstance(event, (Finished, Failed)):
                    self.end = event
        except Exception as e:
            self.end = e
        finally:
            self.ended_at = time.monotonic()
            self.first_message.set()

    def outcome(self) -> dict:
        end = self.end
        kind = {Finished: "finished", Failed: "failed"}.get(type(end), "none" if end is None else "raised")
        error = end.error if isinstance(end, Failed) else None if end is None or kind == "finished" else repr(end)
        return {"instance_id": self.instance_id, "end": kind, "error": error, "messages": len(self.messages),
                "text": "".join(self.messages)}


def watch_recovery(cluster, kept_node: str, lost_targets: dict, since: float, facts: dict) -> None:
    """Record in facts["recovered_s"] when every worker and host runs on the kept node again (each lost
    worker at a new target, joined and live in the directory), polling from the loss on."""
    while time.monotonic() - since < WAIT_S["recovered"]:
        workers = [answer(w.node_id, timeout_s=2.0) for w in cluster.workers]
        hosts = [answer(h.node_id, timeout_s=2.0) for h in cluster.hosts]
        try:
            live = {w.worker_id for w in cluster.directory.workers() if w.live}
            moved = all(cluster.directory.target(worker_id) != target for worker_id, target in lost_targets.items())
        except Exception as e:  # a lost worker not yet back: the directory says it is dead
            live, moved = set(), f"{type(e).__name__}: {e}"
        facts["recovery_seen"] = {"workers": workers, "hosts": hosts, "live": sorted(live), "moved": moved}
        if (all(n == kept_node for n in workers + hosts) and moved is True
                and live == {f"worker-{i}" for i in range(len(cluster.workers))}):
            facts["recovered_s"] = time.monotonic() - since
            return
        time.sleep(0.5)


def pages(cluster) -> dict:
    """Each worker's free pages (None while it is down) and whether its books agree with the directory."""
    free = {f"worker-{i}": answer(w.free_pages) for i, w in enumerate(cluster.workers)}
    try:
        cluster.directory.check_invariants()
        invariants = "hold"
    except Exception as e:
        invariants = f"{type(e).__name__}: {e}"
    live = {w.worker_id: {"live": w.live, "running": w.running} for w in cluster.directory.workers()}
    return {"free": free, "invariants": invariants, "directory": live}


def placement(cluster) -> dict:
    hosts = [ray.get(h.address.remote(), timeout=30)[0] for h in cluster.hosts]
    directory_id = cluster.directory_actor._actor_id.hex()
    directory_node = ray._private.state.actors(directory_id)["Address"]["NodeID"]
    return {"workers": ray.get([w.node_id.remote() for w in cluster.workers], timeout=30),
            "hosts": ray.get([h.node_id.remote() for h in cluster.hosts], timeout=30),
            "host_ids": hosts, "directory": directory_node}


def scenario(facts: dict, stack: list) -> None:
    seconds = facts["seconds"]
    facts["config"] = {"num_pages": NUM_PAGES, "long_tokens": LONG_TOKENS, "wait_s": WAIT_S}
    nodes = RayNodes(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "node_ip_address": LOOPBACK, "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_FAILURE})
    stack.append(nodes.shutdown)
    gpu_nodes = [nodes.add_node(node_ip_address=LOOPBACK, num_cpus=1, resources={"gpu_slot": 2, "host_slot": 2})
                 for _ in range(2)]
    ray.init(address=nodes.address, _node_ip_address=LOOPBACK, log_to_driver=False)
    stack.append(ray.shutdown)
    facts["nodes"] = {"head": nodes.head_node.node_id, "gpu": [n.node_id for n in gpu_nodes],
                      "driver": ray.get_runtime_context().get_node_id()}
    seconds["nodes"] = time.monotonic() - _t0
    progress(f"head node and two GPU nodes up at {nodes.address}; starting the cluster")

    spec = ClusterSpec(workers=2, hosts=2, spread=True, worker_resources={"resources": {"gpu_slot": 1}},
                       host_resources={"resources": {"host_slot": 1}}, num_pages=NUM_PAGES, torch_threads=1,
                       dtype="fp32", bind_address=LOOPBACK)
    start = time.monotonic()
    cluster = start_cluster(spec)
    server = serve_service(cluster.gateway_service(), port=0)
    stack.append(lambda: server.stop(0))
    client = PieClient(server.target)
    stack.append(client.close)
    seconds["cluster"] = time.monotonic() - start
    facts["before"] = before = placement(cluster)
    progress(f"cluster up in {seconds['cluster']:.1f} s: workers on {before['workers']}, hosts on {before['hosts']}")

    program = client.upload(build(TEXT))
    warm = [Run(client, program, ["--prompt", "What is the capital of France?", "--max-tokens", "8"])
            for _ in range(2)]  # one on each host: both compile the program before the clock matters
    for run in warm:
        run.thread.join(120)
    facts["warm"] = [run.outcome() for run in warm]

    # The node to lose: the second host's, the one the directory picks second for the gateway (on a tie in load
    # it picks the least host id). A host in this process (the head node) runs one long inferlet pinned to
    # that node's worker: it keeps running while its inferlet's worker goes, and its long prompt takes pages
    # there, so the directory places launches that tie on running inferlets on the other worker. Launched in
    # turn, the gateway's inferlets then run on (kept host, kept worker), (lost host, kept worker), (kept
    # host, lost worker): every case
    local_host = ClusterHost(cluster.directory)
    stack.append(local_host.close)
    local_host.component(TEXT)
    lost_node_id = before["hosts"][before["host_ids"].index(max(before["host_ids"]))]
    lost = next(node for node in gpu_nodes if node.node_id == lost_node_id)
    kept = next(node for node in gpu_nodes if node is not lost)
    pinned_worker = f"worker-{before['workers'].index(lost.node_id)}"
    facts["lost_node"], facts["kept_node"] = lost.node_id, kept.node_id
    facts["lost_targets"] = {f"worker-{i}": answer(w.target) for i, w in enumerate(cluster.workers)
                             if before["workers"][i] == lost.node_id}
    start = time.monotonic()
    pinned_message = threading.Event()
    pinned = local_host.launch(TEXT, ["--prompt", LONG_PROMPT, "--max-tokens", str(PINNED_TOKENS), "--ignore-eos"],
                               worker_id=pinned_worker, on_message=lambda text: pinned_message.set())
    wait_for(pinned_message.is_set, "inferlets running")
    time.sleep(2 * LOAD_REPORT_S)  # the workers' reports of free pages reach the directory

    host_node = dict(zip(before["host_ids"], before["hosts"]))
    worker_node = {f"worker-{i}": node for i, node in enumerate(before["workers"])}
    runs, placed = [], []
    # the gateway's launches, one at a time, until one runs on the lost node's host with its worker on the
    # kept node (its pages must come back there), one on the kept node's host with the lost worker, and one
    # wholly on the kept node (it must finish)
    while len(runs) < MAX_GATEWAY_RUNS:
        run = Run(client, program, ["--prompt", "Tell me a long story.", "--max-tokens", str(LONG_TOKENS),
                                    "--ignore-eos"])
        wait_for(run.first_message.is_set, "inferlets running")
        host_id = run.instance_id.removeprefix("inferlet-").rsplit("-", 1)[0]
        worker_id = cluster.directory.owner(run.instance_id).worker_id
        runs.append(run)
        placed.append({"host_id": host_id, "host_lost": host_node[host_id] == lost.node_id, "worker_id": worker_id,
                       "worker_lost": worker_node[worker_id] == lost.node_id})
        kinds = {(p["host_lost"], p["worker_lost"]) for p in placed}
        if len(runs) >= MIN_GATEWAY_RUNS and {(True, False), (False, True), (False, False)} <= kinds:
            break
    seconds["inferlets running"] = time.monotonic() - start
    facts["running_at_removal"] = [r.ended_at is None for r in runs] + [not pinned.done]
    progress(f"{len(runs)} inferlets running through the gateway ({[(p['host_id'], p['worker_id']) for p in placed]}) "
             f"and one pinned to {pinned_worker} on this process's host; killing their node {lost.node_id[:8]}")

    removed_at = time.monotonic()
    recovery = threading.Thread(target=watch_recovery, args=(cluster, kept.node_id, facts["lost_targets"],
                                                             removed_at, facts), daemon=True)
    nodes.remove_node(lost, allow_graceful=False)  # SIGKILL: a machine that is gone
    recovery.start()
    seconds["remove_node"] = time.monotonic() - removed_at
    wait_for(lambda: all(r.ended_at is not None for r in runs), "inferlets ended")
    facts["runs"] = [{**p, **r.outcome(), "ended_s": round(r.ended_at - removed_at, 2)} for p, r in zip(placed, runs)]
    outcome = pinned.wait(WAIT_S["inferlets ended"])
    facts["pinned"] = {"worker_id": pinned_worker, "end": "finished" if outcome.ok else "failed", "error": outcome.error,
                       "messages": len(outcome.messages)}
    seconds["inferlets"] = time.monotonic() - start
    progress("inferlets ended: " + ", ".join(f"{r['instance_id']} {r['end']}" for r in facts["runs"]) +
             f", the pinned one {facts['pinned']['end']}")

    # the kept node's worker: every page back once its inferlets ended and the lost host's connections broke
    kept_workers = [i for i, node in enumerate(before["workers"]) if node == kept.node_id]
    try:
        seconds["pages back"] = wait_for(lambda: all(answer(cluster.workers[i].free_pages) == NUM_PAGES
                                                     for i in kept_workers), "pages back")
    except TimeoutError as e:
        facts["pages_timeout"] = str(e)
    facts["after_loss"] = pages(cluster)
    progress(f"after the loss: {facts['after_loss']}")

    recovery.join(WAIT_S["recovered"])
    if "recovered_s" not in facts:
        raise TimeoutError(f"the workers and hosts were not all back on the kept node within {WAIT_S['recovered']} s "
                           f"of the loss: {facts.get('recovery_seen')}")
    facts["after"] = placement(cluster)
    progress(f"recovered {facts['recovered_s']:.1f} s after the loss: workers on "
             f"{facts['after']['workers']}, hosts on {facts['after']['hosts']}")
    again = [Run(client, program, ["--prompt", "What is the capital of France?", "--max-tokens", "8"])
             for _ in range(2)]  # the gateway spreads them: one on each host, the restarted one too
    for run in again:
        run.thread.join(120)
    facts["again"] = [run.outcome() for run in again]
    facts["again_hosts"] = [run.instance_id and run.instance_id.removeprefix("inferlet-").rsplit("-", 1)[0]
                            for run in again]
    try:
        wait_for(lambda: all(answer(w.free_pages) == NUM_PAGES for w in cluster.workers), "pages back")
    except TimeoutError as e:
        facts["pages_timeout_at_end"] = str(e)
    facts["at_end"] = pages(cluster)
    facts["idle"] = [repr(e) if (e := _check_idle(w)) else "idle" for w in cluster.workers]
    seconds["total"] = time.monotonic() - _t0
    progress(f"done in {seconds['total']:.1f} s")


def _check_idle(worker) -> Exception | None:
    try:
        ray.get(worker.check_idle.remote(), timeout=30)
    except Exception as e:
        return e
    return None


def main() -> int:
    facts: dict = {"seconds": {}}
    stack: list = []  # what to stop, in reverse
    try:
        scenario(facts, stack)
    except BaseException:
        facts["error"] = traceback.format_exc()
        progress(f"failed: {facts['error']}")
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as e:
                progress(f"stopping {stop}: {e!r}")
    print(json.dumps(facts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
