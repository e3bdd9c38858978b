"""The capacity model's inputs (docs/capacity.md): what one launch, one relayed message and one copied
KV page cost in cluster mode, and how many calls a second the directory actor answers.

    python -m cluster.bench.capacity [--launches 100] [--concurrency 8] [--messages 2000] [--copy-pages 64]
                                     [--copy-repeats 6] [--json OUT] [--png OUT]
    python -m cluster.bench.capacity --from-json RUN.json [--png OUT]   # the table and projection again

One local Ray, one cluster: the directory actor (CountingDirectory: the real one, counting and timing
every call it answers, by method), 2 worker actors (the page copy needs two; nothing else here runs
the model) and 1 host actor. Measured in this order:

1. directory in process (no Ray): its own time per call of the launch path, with 0, 1000 and 10000
   inferlets in its tables (what a large cluster holds).
2. directory actor: calls a second answered to 1 and 4 threads of this process (pick_host +
   unpick_host pairs), and the directory process's CPU per call; likewise the cluster's message bus,
   which runs in the directory's process (push + pull pairs over a RemoteBus, as hosts call it).
3. launch hops: --launches launches one after another of a trivial inferlet
   (inferlets/bench/send_messages.py sending nothing) through a gateway in this process, over loopback
   gRPC: the client's Launch -> `started`; the gateway's pick_host round trip and its Launch to the
   host (which makes the host's place_owner and instance_started round trips); the directory's own
   time per call; the directory calls per launch, counted by the directory. Then --concurrency clients
   launching back to back (--concurrent-launches in all): launches a second, each process's CPU per launch.
4. event relay: --concurrency inferlets each sending --messages 16-byte messages, read through a
   gateway in a process of its own (GatewayProcess), then straight from the host: messages a second,
   µs per message, and each process's CPU per message.
5. page copy: an export of --copy-pages pages moved between the two workers (kv_migration.move_export,
   without its settle wait) --copy-repeats times: MB/s.

Then a projection to clusters of 8, 64 and 512 GPUs (`project`): the measured costs times the load the
assumptions at its head put on each part. Progress goes to stderr, the tables to stdout. Figures are one
run's; docs/capacity.md says how far they carry.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from cluster.actors.directory_actor import Directory, DirectoryHandle
from cluster.api.grpc_client import Failed, Finished, Message, PieClient, Started
from cluster.api.grpc_server import serve_service
from cluster.bench.cluster_harness import ROOT, CpuMeter, GatewayProcess, start, stats_delta
from cluster.runtime.inferlet_build import build

SEND_MESSAGES = ROOT / "inferlets" / "bench" / "send_messages.py"
MESSAGE_BYTES = 16
SCALES = ((8, 1), (64, 8), (512, 64))  # (GPUs = workers, hosts) of the in-process directory timing
RUNNING_PER_GPU = 256  # inferlets running per GPU in those tables: vLLM's default batch cap (docs/capacity.md)
HINT_TOKENS = 256  # a launch's prompt hint, for place_owner's prefix lookup


def progress(text: str) -> None:
    print(f"[capacity] {text}", file=sys.stderr, flush=True)


# -- loads ---------------------------------------------------------------------------------------------------
def run_inferlet(client: PieClient, program_id: str, arguments: list[str]) -> dict:
    """One launch read to its end: seconds to `started`, to the end, and the messages received."""
    t0 = time.perf_counter()
    started = end = None
    messages = 0
    for event in client.launch(program_id, arguments):
        if isinstance(event, Started):
            started = time.perf_counter() - t0
        elif isinstance(event, Message):
            messages += 1
        elif isinstance(event, Failed):
            raise RuntimeError(f"an inferlet failed: {event.error}")
        elif isinstance(event, Finished):
            end = time.perf_counter() - t0
    return {"started_s": started, "end_s": end, "messages": messages}


def closed_loop(clients: list[PieClient], program_id: str, arguments: list[str], concurrency: int,
                per_client: int) -> dict:
    """`concurrency` threads, each launching `per_client` inferlets one after another (thread i through
    clients[i % len(clients)]): launches and messages a second over the whole run."""
    runs: list[dict] = []
    lock = threading.Lock()

    def client_thread(i: int) -> None:
        for _ in range(per_client):
            result = run_inferlet(clients[i % len(clients)], program_id, arguments)
            with lock:
                runs.append(result)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(runs) != concurrency * per_client:
        raise RuntimeError(f"{concurrency * per_client - len(runs)} launches failed (see the traceback above)")
    messages = sum(r["messages"] for r in runs)
    return {"wall_s": wall, "launches": len(runs), "launches_per_s": len(runs) / wall, "messages": messages,
            "messages_per_s": messages / wall,
            "started_ms_median": 1e3 * statistics.median(r["started_s"] for r in runs)}


def per_unit(cpu: dict[str, float], units: int, scale: float = 1e6) -> dict[str, float]:
    """CPU seconds per unit (µs by default) of each process, and cores busy over the run."""
    out = {f"{name}_cpu_us": scale * s / units for name, s in cpu.items() if name != "wall"}
    out["machine_cores_busy"] = cpu["machine"] / cpu["wall"]
    return out


# -- 1. the directory in process -----------------------------------------------------------------------------
def directory_in_process(rounds: int = 1000) -> dict:
    """The directory's own µs per call of the launch path (no Ray), in a directory holding what a cluster of
    each of SCALES holds: a worker per GPU, a host per node of 8, RUNNING_PER_GPU inferlets per GPU."""
    hint = list(range(1000, 1000 + HINT_TOKENS))
    results = {}
    for gpus, hosts in SCALES:
        rounds_here = max(40, rounds * SCALES[0][0] // gpus)  # the large tables' calls are slow: fewer suffice
        d = Directory(16)
        for i in range(gpus):
            d.register(f"w{i}", 100_000, 16)
        def report() -> None:  # as the hosts do every second: a host silent for HOST_STALE_S gets nothing
            for i in range(hosts):
                d.host_alive(f"h{i}", f"127.0.0.1:{9000 + i}", max_running=1 << 20)

        report()
        for i in range(gpus * RUNNING_PER_GPU):
            d.add_owner(f"bg-{i}", f"h{i % hosts}", f"w{i % gpus}")
            d.instance_started(f"bg-{i}", f"h{i % hosts}", "p" * 64, "d" * 64)
        times = collections.defaultdict(float)

        def timed(name: str, call: Callable):
            t0 = time.perf_counter()
            value = call()
            times[name] += time.perf_counter() - t0
            return value

        for r in range(rounds_here):  # one launch's calls, in its order (the pick given back: it stays balanced)
            if r % 20 == 0:
                report()
            instance = f"x-{r}"
            picked = timed("pick_host", lambda: d.pick_host(()))
            d.unpick_host(picked.host_id)
            if r % 2:
                timed("place_owner", lambda: d.place_owner(instance, "h0", ()))
            else:
                timed(f"place_owner, {HINT_TOKENS}-token hint", lambda: d.place_owner(instance, "h0", hint))
            timed("instance_started", lambda: d.instance_started(instance, "h0", "p" * 64, "d" * 64))
            timed("instance", lambda: d.instance(instance))
            timed("instance_ended", lambda: d.instance_ended(instance))
            timed("owner_ended", lambda: d.owner_ended(instance))
        counts = {name: rounds_here / 2 if name.startswith("place_owner") else rounds_here for name in times}
        results[f"{gpus} GPUs"] = {name: 1e6 * s / counts[name] for name, s in sorted(times.items())}
        progress(f"directory in process, {gpus} workers, {hosts} hosts, {gpus * RUNNING_PER_GPU} inferlets: "
                 + ", ".join(f"{k} {v:.1f} µs" for k, v in results[f"{gpus} GPUs"].items()))
    return results


# -- 2. the directory actor's throughput ---------------------------------------------------------------------
def directory_throughput(directory: DirectoryHandle, directory_pid: int, host_id: str, seconds: float,
                         threads: int) -> dict:
    """pick_host + unpick_host pairs from `threads` threads for `seconds`: calls a second answered, and the
    directory process's CPU per call."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            directory.pick_host(())
            directory.unpick_host(host_id)
            counts[i] += 2

    meter = CpuMeter({"directory": directory_pid, "bench": os.getpid()}).start()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu = meter.stop()
    calls = sum(counts)
    row = {"threads": threads, "calls": calls, "calls_per_s": calls / cpu["wall"],
           "round_trip_us": 1e6 * cpu["wall"] * threads / calls} | per_unit(cpu, calls)
    progress(f"directory actor, {threads} threads: {row['calls_per_s']:.0f} calls/s, "
             f"{row['directory_cpu_us']:.0f} µs of its CPU a call")
    return row


def bus_throughput(bus_target: Callable[[], str], token: str, directory_pid: int, seconds: float,
                   threads: int) -> dict:
    """push + pull pairs on the cluster's message bus (in the directory's process) from `threads` threads,
    each on a queue of its own, for `seconds`: bus calls a second, and the directory process's CPU per call."""
    from cluster.rpc.bus_service import RemoteBus

    bus = RemoteBus(bus_target, token=token)
    bus.store_keys()  # connected before the clock starts
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(i: int) -> None:
        queue, me = f"capacity-{i}", f"capacity-bench-{i}"
        while time.perf_counter() < stop:
            bus.push(me, queue, "x" * MESSAGE_BYTES)
            bus.pull(me, queue, 10.0).wait(30)
            counts[i] += 2

    meter = CpuMeter({"directory": directory_pid, "bench": os.getpid()}).start()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu = meter.stop()
    bus.close()
    calls = sum(counts)
    row = {"threads": threads, "calls": calls, "calls_per_s": calls / cpu["wall"],
           "round_trip_us": 1e6 * cpu["wall"] * threads / calls} | per_unit(cpu, calls)
    progress(f"message bus, {threads} threads: {row['calls_per_s']:.0f} calls/s, "
             f"{row['directory_cpu_us']:.0f} µs of the directory process's CPU a call")
    return row


# -- 3. the launch path ---------------------------------------------------------------------------------------
class TimedCalls:
    """A DirectoryHandle (or anything) whose method calls are timed by name, as its caller sees them."""

    def __init__(self, inner):
        self._inner = inner
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def __getattr__(self, name: str):
        method = getattr(self._inner, name)

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.times[name].append(time.perf_counter() - t0)
        return call


def launch_hops(cluster, directory_actor, pids: dict[str, int], program: Path, launches: int,
                concurrency: int, concurrent_launches: int, idle_s: float = 3.0) -> dict:
    """Sequential launches of a trivial inferlet through a gateway here, then `concurrency` at once."""
    import ray

    service = cluster.gateway_service()
    timed = TimedCalls(service.directory)
    service.directory = timed
    launch_on = service._launch_on
    host_launch: list[float] = []

    def timed_launch_on(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return launch_on(*args, **kwargs)
        finally:
            host_launch.append(time.perf_counter() - t0)

    service._launch_on = timed_launch_on
    server = serve_service(service, port=0)
    try:
        with PieClient(server.target, timeout_s=600) as client:
            program_id = client.upload(program)
            for _ in range(5):  # warm: the host gets the program, compiles it, first instances
                run_inferlet(client, program_id, ["0"])
            timed.times.clear()
            host_launch.clear()
            before = ray.get(directory_actor.call_stats.remote())
            runs = [run_inferlet(client, program_id, ["0"]) for _ in range(launches)]
            time.sleep(0.3)  # the last inferlet's end reaches the directory
            calls = stats_delta(ray.get(directory_actor.call_stats.remote()), before)
            wall = sum(r["end_s"] for r in runs)
            sequential = {
                "launches": launches,
                "started_ms": 1e3 * statistics.median(r["started_s"] for r in runs),
                "started_ms_p90": 1e3 * statistics.quantiles([r["started_s"] for r in runs], n=10)[-1],
                "end_ms": 1e3 * statistics.median(r["end_s"] for r in runs),
                "gateway_pick_host_ms": 1e3 * statistics.median(timed.times["pick_host"]),
                "gateway_to_host_launch_ms": 1e3 * statistics.median(host_launch),
                # per launch, counted by the directory (the hosts' once-a-second reports and the workers'
                # load reports over the same seconds are in it too: `background_per_s` says how many)
                "directory_calls": {name: n / launches for name, (n, _) in calls.items()},
                "directory_own_us": {name: 1e6 * s / n for name, (n, s) in calls.items()},
                "wall_s": wall,
            }
            progress(f"launch -> started {sequential['started_ms']:.1f} ms (gateway pick_host "
                     f"{sequential['gateway_pick_host_ms']:.2f} ms, gateway -> host launch "
                     f"{sequential['gateway_to_host_launch_ms']:.1f} ms); directory calls a launch: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in sequential["directory_calls"].items()))
            before = ray.get(directory_actor.call_stats.remote())
            time.sleep(idle_s)
            idle = stats_delta(ray.get(directory_actor.call_stats.remote()), before)
            sequential["background_per_s"] = {name: n / idle_s for name, (n, _) in idle.items()
                                              if name != "call_stats"}
            per_client = max(2, concurrent_launches // concurrency)
            meter = CpuMeter(pids | {"bench (gateway + client)": os.getpid()}).start()
            loaded = closed_loop([client], program_id, ["0"], concurrency, per_client)
            cpu = meter.stop()
            loaded |= per_unit(cpu, loaded["launches"], scale=1e3)  # ms of CPU a launch
            loaded["concurrency"] = concurrency
            progress(f"{concurrency} clients launching back to back: {loaded['launches_per_s']:.1f} launches/s")
    finally:
        server.stop(0)
    return {"sequential": sequential, "concurrent": loaded}


# -- 4. the event relay --------------------------------------------------------------------------------------
def relay(gateway: GatewayProcess, host_target: str, token: str, pids: dict[str, int], program: Path,
          concurrency: int, messages: int, repeats: int = 2) -> dict:
    """Messages a second and CPU per message, through a gateway process and straight from the host."""
    arguments = [str(messages), str(MESSAGE_BYTES)]
    rows = {}
    for name, target, extra in (("via gateway", gateway.target, {"gateway": gateway.pid}),
                                ("host direct", host_target, {})):
        with PieClient(target, token=token if name == "host direct" else None, timeout_s=600) as client:
            program_id = client.upload(program)
            run_inferlet(client, program_id, ["10"])  # warm
            meter = CpuMeter(pids | extra | {"client": os.getpid()}).start()
            result = closed_loop([client], program_id, arguments, concurrency, repeats)
            cpu = meter.stop()
        rows[name] = result | per_unit(cpu, result["messages"]) | {"us_per_message": 1e6 / result["messages_per_s"]}
        progress(f"relay {name}: {result['messages_per_s']:.0f} messages/s")
    return rows


# -- 5. page copy between workers ----------------------------------------------------------------------------
def page_copy(cluster, pages: int, repeats: int) -> dict:
    """An export of `pages` pages made on worker-0, then moved between the two workers `repeats` times."""
    from cluster.actors import kv_migration
    from cluster.actors.cluster_host import ClusterHost

    directory = cluster.directory
    with ClusterHost(directory) as host:
        source = host.connection("worker-0")
        owner, name = "capacity-bench-export", "capacity-bench/pages"
        directory.add_owner(owner, host.host_id, "worker-0")
        held = source.allocate(owner, pages, pages)
        directory.export(owner, name, held, "", True)
        source.export(owner, name, held, "", True)
        page_bytes = len(source.wait(source.read_pages(owner, held[:1])))
        directory.owner_ended(owner)
        source.release(owner)
        seconds = []
        where = "worker-0"
        for _ in range(repeats):
            to = "worker-1" if where == "worker-0" else "worker-0"
            t0 = time.perf_counter()
            kv_migration.move_export(directory, host.connection, name, to, settle_s=0.0)
            seconds.append(time.perf_counter() - t0)
            where = to
        directory.unexport("capacity-bench", name)
        host.connection(where).unexport("capacity-bench", name)
    mb = pages * page_bytes / 1e6
    row = {"pages": pages, "page_bytes": page_bytes, "mb": mb, "move_s_median": statistics.median(seconds),
           "mb_per_s": mb / statistics.median(seconds), "moves": repeats}
    progress(f"page copy: {pages} pages of {page_bytes} bytes ({mb:.1f} MB) in {row['move_s_median'] * 1e3:.0f} ms: "
             f"{row['mb_per_s']:.0f} MB/s")
    return row


# -- the run ---------------------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    print(f"directory, in process (µs of its own time a call; a cluster of N GPUs: N workers, N/8 hosts, "
          f"{RUNNING_PER_GPU} inferlets a GPU in its tables):")
    sizes = list(results["directory_in_process"])
    print(f"{'call':>28} " + " ".join(f"{s:>9}" for s in sizes))
    for call in results["directory_in_process"][sizes[0]]:
        print(f"{call:>28} " + " ".join(f"{results['directory_in_process'][s][call]:9.1f}" for s in sizes))
    print("\ndirectory actor (pick_host + unpick_host pairs from this process):")
    print(f"{'threads':>18} {'calls/s':>9} {'RTT µs':>9} {'dir CPU µs/call':>16} {'cores busy':>11}")
    for row in results["directory_actor"]:
        print(f"{row['threads']:>18} {row['calls_per_s']:9.0f} {row['round_trip_us']:9.0f} "
              f"{row['directory_cpu_us']:16.0f} {row['machine_cores_busy']:11.2f}")
    print("\nmessage bus in the directory's process (push + pull pairs, 16 bytes, a queue per thread):")
    print(f"{'threads':>18} {'calls/s':>9} {'RTT µs':>9} {'dir CPU µs/call':>16} {'cores busy':>11}")
    for row in results["bus"]:
        print(f"{row['threads']:>18} {row['calls_per_s']:9.0f} {row['round_trip_us']:9.0f} "
              f"{row['directory_cpu_us']:16.0f} {row['machine_cores_busy']:11.2f}")
    seq, conc = results["launch"]["sequential"], results["launch"]["concurrent"]
    print(f"\nlaunch of a trivial inferlet through a gateway (one at a time, {seq['launches']} launches, medians):")
    print(f"{'launch -> started':>34} {seq['started_ms']:8.2f} ms   (p90 {seq['started_ms_p90']:.2f} ms)")
    print(f"{'launch -> end':>34} {seq['end_ms']:8.2f} ms")
    print(f"{'gateway: pick_host round trip':>34} {seq['gateway_pick_host_ms']:8.2f} ms")
    print(f"{'gateway: Launch on host -> started':>34} {seq['gateway_to_host_launch_ms']:8.2f} ms")
    print(f"{'directory method':>34} {'calls/launch':>12} {'own µs/call':>12}")
    for name, n in seq["directory_calls"].items():
        print(f"{name:>34} {n:12.2f} {seq['directory_own_us'][name]:12.1f}")
    print(f"{'background calls/s (idle)':>34} " + ", ".join(f"{k} {v:.1f}" for k, v in seq["background_per_s"].items()))
    print(f"\n{conc['concurrency']} clients launching back to back: {conc['launches_per_s']:.1f} launches/s, "
          f"launch -> started {conc['started_ms_median']:.1f} ms; CPU ms a launch: "
          + ", ".join(f"{k[:-7]} {v:.2f}" for k, v in conc.items() if k.endswith("_cpu_us")))
    print("\nevent relay (16-byte messages):")
    print(f"{'':>12} {'msgs/s':>9} {'µs/msg':>8}  CPU µs a message by process")
    for name, row in results["relay"].items():
        print(f"{name:>12} {row['messages_per_s']:9.0f} {row['us_per_message']:8.1f}  "
              + ", ".join(f"{k[:-7]} {v:.1f}" for k, v in row.items() if k.endswith("_cpu_us")))
    copy = results["page_copy"]
    print(f"\npage copy between workers: {copy['pages']} pages x {copy['page_bytes']} bytes = {copy['mb']:.1f} MB, "
          f"{copy['move_s_median'] * 1e3:.0f} ms a move: {copy['mb_per_s']:.0f} MB/s")


# -- the projection (docs/capacity.md) ---------------------------------------------------------------------
# What a cluster of N GPUs (one worker each, nodes of 8, one host per node) asks of each part, from the
# measured costs above and these assumptions; the sources, and which are guesses, are in docs/capacity.md.
TOKENS_PER_S_PER_GPU = 4000  # a 7B-class model on one H100 with vLLM, 256 sequences at once (~3,958 measured)
TOKENS_PER_LAUNCH = 1000  # a guess: an agent of 8 rounds of ~125 generated tokens
WORKLOADS = {  # name -> (messages to the client a launch, bus calls a launch)
    "agentic": (8, 0),  # a message a round
    "agentic + bus": (8, 32),  # and a swarm's broadcast plus 3 teammates' reads a round
    "streaming": (TOKENS_PER_LAUNCH, 0),  # a message a generated token (text_completion)
}
HOST_CPU_MS_PER_TOKEN = 1.06  # host imports 0.42 + guest wasm 0.64 ms a token, 32 inferlets (docs/benchmarks.md)
GPUS_PER_NODE = 8
LAUNCH_CALLS = ("pick_host", "place_owner", "instance_started", "instance_ended", "owner_ended")
LAUNCH_CALLS_OWN = ("pick_host", "place_owner, 256-token hint", "instance_started", "instance_ended", "owner_ended")


def project(results: dict) -> list[dict]:
    """Per scale of directory_in_process and per workload: the load on each part, in cores (a directory
    above 1.0 is past what its one process can do; gateways and hosts can be added)."""
    call_s = results["directory_actor"][-1]["directory_cpu_us"] * 1e-6  # a directory call, Ray's part and all
    bus_s = results["bus"][-1]["directory_cpu_us"] * 1e-6
    seq, conc = results["launch"]["sequential"], results["launch"]["concurrent"]
    calls_per_launch = sum(n for name, n in seq["directory_calls"].items() if name in LAUNCH_CALLS)
    background = seq["background_per_s"]  # measured with 2 workers and 1 host
    per_worker = background.get("report_load", 0.0) / 2
    per_host = background.get("host_alive", 0.0)
    gateway_msg_s = results["relay"]["via gateway"]["gateway_cpu_us"] * 1e-6
    host_msg_s = results["relay"]["via gateway"]["host-0_cpu_us"] * 1e-6
    host_launch_s = conc["host-0_cpu_us"] * 1e-3  # per_unit in ms for launches
    gateway_launch_s = conc["bench (gateway + client)_cpu_us"] * 1e-3  # the client's part too: an upper bound
    rows = []
    for scale, own_us in results["directory_in_process"].items():
        gpus = int(scale.split()[0])
        hosts = max(1, gpus // GPUS_PER_NODE)
        launches = gpus * TOKENS_PER_S_PER_GPU / TOKENS_PER_LAUNCH
        own_s = sum(own_us[name] for name in LAUNCH_CALLS_OWN) * 1e-6
        for workload, (messages, bus_calls) in WORKLOADS.items():
            directory = (launches * (calls_per_launch * call_s + own_s)
                         + (gpus * per_worker + hosts * per_host) * call_s + launches * bus_calls * bus_s)
            rows.append({
                "gpus": gpus, "workload": workload, "launches_per_s": launches,
                "messages_per_s": launches * messages, "bus_calls_per_s": launches * bus_calls,
                "directory_cores": directory,
                "directory_pick_host_share": launches * own_us["pick_host"] * 1e-6 / directory,
                "gateway_cores": launches * (messages * gateway_msg_s + gateway_launch_s),
                "host_cores": (gpus * TOKENS_PER_S_PER_GPU * HOST_CPU_MS_PER_TOKEN * 1e-3
                               + launches * (host_launch_s + messages * host_msg_s)),
                "hosts_today": hosts,
            })
    return rows


def print_projection(rows: list[dict]) -> None:
    print(f"\nprojection ({TOKENS_PER_S_PER_GPU} tok/s a GPU, {TOKENS_PER_LAUNCH} tokens a launch; cores of this "
          f"machine; the directory is one process: above 1.00 it cannot keep up):")
    print(f"{'GPUs':>5} {'workload':>14} {'launch/s':>9} {'msgs/s':>9} {'bus/s':>7} {'directory':>9} "
          f"{'(pick_host)':>11} {'gateways':>9} {'hosts':>7}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['workload']:>14} {r['launches_per_s']:9.0f} {r['messages_per_s']:9.0f} "
              f"{r['bus_calls_per_s']:7.0f} {r['directory_cores']:9.2f} {r['directory_pick_host_share']:10.0%} "
              f"{r['gateway_cores']:9.1f} {r['host_cores']:7.1f}")


def projection_chart(rows: list[dict], path: str) -> None:
    """Cores each part needs by cluster size, per workload (needs matplotlib: the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.8), sharey=True)
    for ax, workload in zip(axes, workloads):
        mine = [r for r in rows if r["workload"] == workload]
        gpus = [r["gpus"] for r in mine]
        for key, label, style in (("directory_cores", "directory (one process)", "o-"),
                                  ("gateway_cores", "gateway replicas", "s-"), ("host_cores", "hosts", "^-")):
            ax.plot(gpus, [r[key] for r in mine], style, label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set_xlabel("GPUs")
        ax.set_title(workload, fontsize=10)
    axes[0].set_ylabel("cores needed (this machine's)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Projected load: {TOKENS_PER_S_PER_GPU} tok/s a GPU, {TOKENS_PER_LAUNCH} tokens a launch "
                 f"(dashed: one core, all the directory has)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import ray

    ap = argparse.ArgumentParser(prog="python -m cluster.bench.capacity", description=__doc__.split("\n")[0])
    ap.add_argument("--launches", type=int, default=100, help="sequential launches timed hop by hop")
    ap.add_argument("--concurrency", type=int, default=8, help="clients at once (launches, relay)")
    ap.add_argument("--concurrent-launches", type=int, default=400, help="launches by the clients at once, in all")
    ap.add_argument("--messages", type=int, default=2000, help="messages each relay inferlet sends")
    ap.add_argument("--directory-seconds", type=float, default=3.0,
                    help="each directory and bus throughput loop, and the idle window counting background calls")
    ap.add_argument("--directory-rounds", type=int, default=2000, help="in-process directory calls per size")
    ap.add_argument("--copy-pages", type=int, default=64, help="pages of the moved export")
    ap.add_argument("--copy-repeats", type=int, default=6)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the workers' (page bytes follow it)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--png", default=None, help="also draw the projection here (needs matplotlib: the bench extra)")
    ap.add_argument("--from-json", default=None, help="measure nothing: print and project this earlier run's JSON")
    opts = ap.parse_args(argv)
    if opts.from_json:
        return report(json.loads(Path(opts.from_json).read_text()), None, opts.png)
    program = build(SEND_MESSAGES)
    results: dict = {"cores": os.cpu_count(), "dtype": opts.dtype, "message_bytes": MESSAGE_BYTES,
                     "options": {k: v for k, v in vars(opts).items() if k not in ("json", "png", "from_json")},
                     "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    results["directory_in_process"] = directory_in_process(opts.directory_rounds)
    progress("starting a local Ray and the cluster (2 workers, 1 host) ...")
    bench = start(workers=2, dtype=opts.dtype, wait=False)
    gateways: list[GatewayProcess] = []
    try:
        gateways = GatewayProcess.start(1, bench.fields)  # while the workers load the model
        cluster, directory_actor, pids = bench.ready().cluster, bench.directory_actor, bench.pids
        host_id, host_target = ray.get(cluster.hosts[0].address.remote())
        results["directory_actor"] = [directory_throughput(cluster.directory, pids["directory"], host_id,
                                                           opts.directory_seconds, threads) for threads in (1, 4)]
        results["bus"] = [bus_throughput(cluster.directory.bus_target, cluster.internal_token, pids["directory"],
                                         opts.directory_seconds, threads) for threads in (1, 4)]
        results["launch"] = launch_hops(cluster, directory_actor, pids, program, opts.launches, opts.concurrency,
                                        opts.concurrent_launches, idle_s=max(1.0, opts.directory_seconds))
        results["relay"] = relay(gateways[0], host_target, cluster.internal_token, pids, program, opts.concurrency,
                                 opts.messages)
        results["page_copy"] = page_copy(cluster, opts.copy_pages, opts.copy_repeats)
    finally:
        for g in gateways:
            g.stop()
        bench.close()
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return report(results, opts.json, opts.png)


def report(results: dict, json_path: str | None, png_path: str | None) -> int:
    results["projection"] = project(results)
    print_table(results)
    print_projection(results["projection"])
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    if png_path:
        projection_chart(results["projection"], png_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
