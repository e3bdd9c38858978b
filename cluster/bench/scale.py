"""Scaling the cluster's front: 1 vs 2 gateway replicas, and a fixed vs an elastic host pool, at a load
that saturates one replica, in one run.

    python -m cluster.bench.scale [--relay-clients 12] [--messages 1000] [--model-clients 8] [--tokens 8]
                                  [--rounds 3] [--repeats 2] [--pools fixed,elastic] [--json OUT] [--png OUT]

Each pool is a cluster of its own on a local Ray (1 worker, bf16; the counting directory of
cluster/bench/cluster_harness.py): `fixed` has 1 host actor; `elastic` starts with 1 and may grow to 2
(ClusterSpec(max_hosts=2): cluster/actors/host_pool.py). Every host takes at most --max-running
inferlets, so the relay load (--relay-clients at once, above the pool's grow_at of 75%) makes the
elastic pool add its second host; the run waits for it before measuring.

The gateways are GatewayService servers in processes of their own (cluster_harness.GatewayProcess), two per
cluster: the "1 gateway" rows send every client to the first, the "2 gateways" rows split the clients
between both. Serve with num_replicas would add its proxy actor (one more process and hop that every
row pays, and on a small machine its CPU), and the question here is what a replica itself relays.

Two loads, each a closed loop: every client launches --rounds inferlets one after another.
- relay-bound: inferlets/bench/send_messages.py, --messages 16-byte messages each, no model.
- model-bound: inferlets/examples/text_completion.py, --tokens tokens each (--ignore-eos).
Per row: launches a second, messages a second, TTFT and time per output token (medians over requests;
in a relay-bound row, the time between an inferlet's messages), each process's CPU seconds a second
(cores; "machine" counts every process on the machine, "others" what none of the measured ones used:
Ray's daemons and other users' work), the 1-minute load average at its end, and the gateways' and hosts'
CPU per message (a model-bound inferlet sends one a token; its short completions make launches weigh in).
Each repeat runs every row of a pool (1 and 2 gateways in alternating order); figures are medians over
repeats, and a ratio the median of paired ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from cluster.api.grpc_client import Failed, Message, PieClient, Started
from cluster.bench.capacity import SEND_MESSAGES, MESSAGE_BYTES
from cluster.bench.cluster_harness import CpuMeter, GatewayProcess, start
from cluster.runtime.inferlet_build import build

ROOT = Path(__file__).resolve().parents[2]
TEXT_COMPLETION = ROOT / "inferlets" / "examples" / "text_completion.py"
PROMPTS = ("What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
           "Write a haiku about the sea.")
POOLS = {"fixed": {"hosts": 1}, "elastic": {"hosts": 1, "max_hosts": 2, "host_idle_s": 3600.0}}
GROW_TIMEOUT_S = 180.0
HOLD_S = 2.0  # how long the warm-up's inferlets hold their places on an elastic pool's first host


def progress(text: str) -> None:
    print(f"[scale] {text}", file=sys.stderr, flush=True)


def load(clients: list[PieClient], program_ids: list[str], arguments, concurrency: int, rounds: int) -> dict:
    """`concurrency` threads, thread i launching through clients[i % len(clients)] (program_ids[i % ...]:
    each gateway's id of the program) `rounds` inferlets one after another, arguments(i, round) each."""
    requests: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_thread(i: int) -> None:
        client, program_id = clients[i % len(clients)], program_ids[i % len(clients)]
        for r in range(rounds):
            t0 = time.perf_counter()
            started, times = None, []
            for event in client.launch(program_id, arguments(i, r)):
                if isinstance(event, Started):
                    started = time.perf_counter()
                elif isinstance(event, Message):
                    times.append(time.perf_counter())
                elif isinstance(event, Failed):
                    with lock:
                        errors.append(event.error)
            with lock:
                requests.append({"t0": t0, "started": started, "times": times})

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} inferlets failed; first: {errors[0]}")
    messages = sum(len(r["times"]) for r in requests)
    decoded = [r for r in requests if len(r["times"]) >= 2]
    return {"wall_s": wall, "launches": len(requests), "launches_per_s": len(requests) / wall,
            "messages": messages, "messages_per_s": messages / wall,
            "started_ms": 1e3 * statistics.median(r["started"] - r["t0"] for r in requests),
            "ttft_ms": 1e3 * statistics.median(r["times"][0] - r["t0"] for r in requests if r["times"]),
            "tpot_ms": 1e3 * statistics.median((r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1)
                                               for r in decoded) if decoded else float("nan")}


def loadavg() -> float:
    """The machine's 1-minute load average (this run's processes included)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def cores(cpu: dict[str, float], gateway_names: list[str]) -> dict[str, float]:
    """CPU seconds a second (cores busy) of each process over the row; the gateways' summed."""
    wall = cpu.pop("wall")
    out = {f"{name}_cores": s / wall for name, s in cpu.items() if name not in gateway_names}
    out["gateways_cores"] = sum(cpu[name] for name in gateway_names) / wall
    return out


def measure_pool(pool: str, opts, programs: dict[str, Path]) -> tuple[dict, list[dict]]:
    """Every row of one pool, --repeats times: (facts about the pool, the repeats' rows)."""
    import ray

    bench = start(workers=1, dtype=opts.dtype, wait=False, max_running=opts.max_running, **POOLS[pool])
    facts: dict = {"spec": bench.fields}
    repeats: list[dict] = []
    gateways: list[GatewayProcess] = []
    try:
        gateways = GatewayProcess.start(2, bench.fields)  # while the worker loads the model
        cluster, pids = bench.ready().cluster, bench.pids
        clients = [PieClient(g.target, timeout_s=600) for g in gateways]
        ids = {name: [c.upload(path) for c in clients] for name, path in programs.items()}
        relay_args = lambda i, r: [str(opts.messages), str(MESSAGE_BYTES)]
        model_args = lambda i, r: ["--prompt", PROMPTS[(i + r) % len(PROMPTS)], "--max-tokens", str(opts.tokens),
                                   "--ignore-eos"]
        loads = {"relay": (ids["relay"], relay_args, opts.relay_clients),
                 "model": (ids["model"], model_args, opts.model_clients)}
        progress(f"{pool} pool: warming (the hosts compile both programs; an elastic pool grows) ...")
        t0 = time.perf_counter()
        load(clients, ids["relay"], relay_args, opts.relay_clients, 1)
        load(clients, ids["model"], lambda i, r: model_args(i, r)[:3] + ["2"], 2, 1)
        if "max_hosts" in POOLS[pool]:  # inferlets that hold their places until the pool has grown
            hold = lambda i, r: ["1", str(MESSAGE_BYTES), str(int(1e3 * HOLD_S))]
            deadline = time.monotonic() + GROW_TIMEOUT_S
            while len(cluster.directory.hosts()) < POOLS[pool]["max_hosts"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the elastic pool did not grow to {POOLS[pool]['max_hosts']} hosts "
                                       f"in {GROW_TIMEOUT_S:.0f} s")
                load(clients, ids["relay"], hold, opts.relay_clients, 1)
            facts["grown_after_s"] = time.perf_counter() - t0
            load(clients, ids["relay"], relay_args, opts.relay_clients, 1)  # the new host compiles the programs
            load(clients, ids["model"], lambda i, r: model_args(i, r)[:3] + ["2"], 2, 1)
        hosts = cluster.directory.hosts()
        facts["hosts"] = len(hosts)
        host_pids = {}
        for h in hosts:
            actor = ray.get_actor(h.actor_name, namespace="pie")
            host_pids[h.actor_name] = ray.get(actor.pid.remote())
        gateway_pids = {f"gateway-{i}": g.pid for i, g in enumerate(gateways)}
        meter_pids = {"directory": pids["directory"], "worker-0": pids["worker-0"], "client": os.getpid()}
        for r in range(opts.repeats):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            repeat = {}
            for kind, (program_ids, arguments, concurrency) in loads.items():
                for n in order:
                    name = f"{pool} {kind} {n}gw"
                    progress(f"repeat {r + 1}/{opts.repeats}: {name} ({concurrency} clients) ...")
                    meter = CpuMeter(meter_pids | host_pids | gateway_pids).start()
                    row = load(clients[:n], program_ids[:n], arguments, concurrency, opts.rounds)
                    cpu = meter.stop()
                    # CPU of every process on the machine that is none of the cluster's measured ones: Ray's
                    # daemons (~0.1 core), and other users' work, which a 2-core box shares
                    unaccounted = (cpu["machine"] - sum(v for k, v in cpu.items() if k not in ("machine", "wall")))
                    host_cores = sum(cpu.pop(h) for h in host_pids) / cpu["wall"]
                    row |= cores(cpu, list(gateway_pids)) | {"hosts_cores": host_cores}
                    row |= {"pool": pool, "load": kind, "gateways": n, "hosts": len(hosts),
                            "unaccounted_cores": unaccounted / row["wall_s"], "loadavg_1m": loadavg(),
                            # CPU per message (a model-bound inferlet sends one a token): where a message's time goes
                            "gateway_us_per_message": 1e6 * row["gateways_cores"] / row["messages_per_s"],
                            "host_us_per_message": 1e6 * host_cores / row["messages_per_s"]}
                    repeat[name] = row
                    progress(f"  {row['launches_per_s']:.1f} launches/s, {row['messages_per_s']:.0f} messages/s, "
                             f"TPOT {row['tpot_ms']:.1f} ms, gateways {row['gateways_cores']:.2f} cores, "
                             f"hosts {host_cores:.2f}, machine {row['machine_cores']:.2f}")
            repeats.append(repeat)
        for c in clients:
            c.close()
    finally:
        for g in gateways:
            g.stop()
        bench.close()
    return facts, repeats


def summarize(repeats: list[dict]) -> dict:
    """Median rows over repeats, and the paired ratios (2 gateways / 1, elastic / fixed)."""
    names = list(dict.fromkeys(name for rep in repeats for name in rep))
    rows = {}
    for name in names:
        runs = [rep[name] for rep in repeats if name in rep]
        rows[name] = {k: (statistics.median(x[k] for x in runs) if isinstance(runs[0][k], (int, float))
                          and not isinstance(runs[0][k], bool) else runs[0][k]) for k in runs[0]}
    ratios = {}
    metrics = ("launches_per_s", "messages_per_s", "tpot_ms")
    for name in names:
        pool, kind, gw = name.split()
        pairs = []
        if gw == "2gw":
            pairs.append((f"{pool} {kind} 2gw / 1gw", name, f"{pool} {kind} 1gw"))
        if pool == "elastic":
            pairs.append((f"elastic / fixed {kind} {gw}", name, f"fixed {kind} {gw}"))
        for label, num, den in pairs:
            paired = [rep[num] for rep in repeats if num in rep and den in rep]
            if paired:
                per = [{m: rep[num][m] / rep[den][m] for m in metrics if rep[den][m]} for rep in repeats
                       if num in rep and den in rep]
                ratios[label] = {m: statistics.median(p[m] for p in per) for m in metrics} | {"each": per}
    return {"rows": rows, "ratios": ratios}


def print_table(results: dict) -> None:
    print(f"{'':>22} {'hosts':>5} {'launch/s':>9} {'msgs/s':>8} {'TTFT ms':>8} {'TPOT ms':>8} "
          f"{'gw cores':>8} {'host cores':>10} {'dir cores':>9} {'client':>7} {'machine':>7} {'gw µs/msg':>9} "
          f"{'host µs/msg':>11}")
    for name, row in results["rows"].items():
        print(f"{name:>22} {int(row['hosts']):>5} {row['launches_per_s']:9.2f} {row['messages_per_s']:8.0f} "
              f"{row['ttft_ms']:8.1f} {row['tpot_ms']:8.2f} {row['gateways_cores']:8.2f} {row['hosts_cores']:10.2f} "
              f"{row['directory_cores']:9.2f} {row['client_cores']:7.2f} {row['machine_cores']:7.2f} "
              f"{row['unaccounted_cores']:6.2f} {row['gateway_us_per_message']:9.0f} "
              f"{row['host_us_per_message']:11.0f}")
    print()
    for label, ratio in results["ratios"].items():
        each = ", ".join(f"{p.get('messages_per_s', 0):.2f}" for p in ratio["each"])
        print(f"{label:>32}  launches/s {ratio['launches_per_s']:.3f}x  msgs/s {ratio['messages_per_s']:.3f}x  "
              f"TPOT {ratio['tpot_ms']:.3f}x   (msgs/s, each repeat: {each})")


def chart(results: dict, path: str) -> None:
    """Messages a second (relay-bound) and launches a second (model-bound), row by row (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, metric, label in ((axes[0], "relay", "messages_per_s", "messages/s (relay-bound)"),
                                    (axes[1], "model", "launches_per_s",
                                     "launches/s (model-bound, short completions)")):
        names = [n for n, r in rows.items() if r["load"] == kind]
        ax.bar(range(len(names)), [rows[n][metric] for n in names],
               color=["#4c72b0" if rows[n]["gateways"] == 1 else "#dd8452" for n in names])
        for i, n in enumerate(names):  # each repeat
            each = [rep[n][metric] for rep in results.get("repeats", []) if n in rep]
            ax.plot([i] * len(each), each, "k.", ms=4)
        ax.set_xticks(range(len(names)), [f"{rows[n]['pool']}\n{int(rows[n]['gateways'])} gw, {int(rows[n]['hosts'])} "
                                          f"host{'s' if rows[n]['hosts'] > 1 else ''}" for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"1 vs 2 gateway replicas, fixed vs elastic host pool ({results['cores']} cores, one run; "
                 f"bars: medians, dots: repeats)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--relay-clients", type=int, default=12, help="inferlets at once in the relay-bound load")
    ap.add_argument("--messages", type=int, default=1000, help="messages each relay-bound inferlet sends")
    ap.add_argument("--model-clients", type=int, default=8, help="inferlets at once in the model-bound load")
    ap.add_argument("--tokens", type=int, default=8, help="tokens each model-bound inferlet generates")
    ap.add_argument("--rounds", type=int, default=3, help="inferlets each client runs one after another, per row")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-running", type=int, default=16, help="inferlets per host (the elastic pool grows at 75%%)")
    ap.add_argument("--pools", default="fixed,elastic", help="which host pools: fixed, elastic or both")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--png", default=None, help="also draw the rows here (needs matplotlib: the bench extra)")
    ap.add_argument("--from-json", default=None, help="measure nothing: print and draw this earlier run's JSON")
    opts = ap.parse_args(argv)
    if opts.from_json:
        results = json.loads(Path(opts.from_json).read_text())
    else:
        pools = [p for p in opts.pools.split(",") if p]
        unknown = [p for p in pools if p not in POOLS]
        if unknown:
            ap.error(f"--pools takes {', '.join(POOLS)}, not {', '.join(unknown)}")
        programs = {"relay": build(SEND_MESSAGES), "model": build(TEXT_COMPLETION)}
        results = {"cores": os.cpu_count(), "options": {k: v for k, v in vars(opts).items()
                                                        if k not in ("json", "png", "from_json")}, "pools": {}}
        repeats: list[dict] = [{} for _ in range(opts.repeats)]
        for pool in pools:
            facts, pool_repeats = measure_pool(pool, opts, programs)
            results["pools"][pool] = facts
            for merged, rep in zip(repeats, pool_repeats):
                merged.update(rep)
        results["repeats"] = repeats
        results |= summarize(repeats)
    print_table(results)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    if opts.png:
        chart(results, opts.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
