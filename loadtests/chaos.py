"""Chaos in cluster mode: under a steady locust load, kill a random worker or host actor every
--kill-every seconds (Ray restarts it) and check what the cluster promises: the inferlets on the
killed actor fail with an error naming it, every other one finishes, the pages come back, and
throughput recovers after each restart.

    .venv/bin/python loadtests/chaos.py [--duration 6m] [--kill-every 60] [--workers 2] [--hosts 2]
                                        [--users 4] [--out-dir DIR] [--png chaos.png]

It starts a local Ray of its own, then `pie serve --ray --ray-address <it>` against it,
so that this process can find the actors by name and `ray.kill` them; locust (loadtests/locustfile.py's
TextCompletionUser, gRPC launches) runs in its own process. After each kill it waits for the actor's
restart (a new process answering; a worker also rejoining the directory) and records how long it took.

Checks: every failed launch names a worker or a host in its error (no bare gRPC errors, no hangs), no
more launches fail than were running at the kills, the cluster's pages are all back (free + cached)
with nothing running at the end, the workers' page books agree (check_idle) and so does the directory,
and the completions per second in the last --window seconds before each next kill (or the end) are at
least --recovered of those before the first kill.

Writes chaos.json (kills, restarts, completions over time, the verdict), locust's CSV files and the
server log to --out-dir, and a chart with --png. Exit status: 0 when every check passed, 1 when one
failed, 2 when the test could not run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import (ROOT, Check, PieClient, Server, SetupError, build_component, check_locust, duration,
                     print_verdict, read_report, say, seconds, upload, wait_for_health)

TEXT = ROOT / "inferlets" / "examples" / "text_completion.py"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
CAUSES = ("worker", "host")  # a failed launch's error names the kind of actor that took it down


@dataclass
class Kill:
    at: float  # seconds since the load started
    actor: str  # its Ray name
    restarted_after: float | None  # seconds until its new process answered (and, a worker, rejoined)



def start_ray() -> str:
    """A local Ray of this process, its workers at normal priority; returns the GCS address."""
    import ray

    from cluster.actors.cluster import init_local_ray

    init_local_ray(num_cpus=os.cpu_count() or 2)
    return ray.get_runtime_context().gcs_address


def actors(workers: int, hosts: int) -> dict:
    import ray

    from cluster.actors.cluster import HOST_NAME, WORKER_NAME
    from cluster.actors.directory_actor import NAMESPACE

    names = [WORKER_NAME.format(i) for i in range(workers)] + [HOST_NAME.format(i) for i in range(hosts)]
    return {name: ray.get_actor(name, namespace=NAMESPACE) for name in names}


def directory():
    import ray

    from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE

    return ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)


def answer(method, timeout_s: float = 5.0):
    """What an actor method returns, or None while the actor is down or restarting."""
    import ray

    try:
        return ray.get(method.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        return None


def kill_and_wait(name: str, handle, at: float, timeout_s: float) -> Kill:
    """ray.kill (Ray restarts it), then wait for a new process to answer and a worker to rejoin."""
    import ray

    old_pid = answer(handle.pid)
    t0 = time.monotonic()
    ray.kill(handle, no_restart=False)
    say(f"{at:6.0f} s: killed {name} (pid {old_pid}); waiting for Ray to restart it ...")
    while time.monotonic() - t0 < timeout_s:
        pid = answer(handle.pid)
        if pid not in (None, old_pid):
            if not name.startswith("pie-worker") or all(w.live for w in (answer(directory().workers) or [])):
                took = time.monotonic() - t0
                say(f"{at + took:6.0f} s: {name} is back (pid {pid}) after {took:.1f} s")
                return Kill(at, name, took)
        time.sleep(0.5)
    say(f"{name} did not come back within {timeout_s:.0f} s")
    return Kill(at, name, None)


def completions(history: Path, t0_wall: float) -> list[tuple[float, int]]:
    """(seconds since the load started, launches finished so far) from locust's full stats history."""
    points = []
    with open(history, newline="") as f:
        for row in csv.DictReader(f):
            if row["Type"] == "grpc" and row["Name"] == "e2e":
                done = int(row["Total Request Count"]) - int(row["Total Failure Count"])
                points.append((int(row["Timestamp"]) - t0_wall, done))
    return points


def rate(points: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Launches finished per second between two times (None when the history does not span them)."""
    inside = [(t, n) for t, n in points if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < (end - start) / 2:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def judge(report: dict, kills: list[Kill], points, load_s: float, opts, final) -> list[Check]:
    checks = []
    e2e = report["requests"].get("grpc e2e", {"count": 0, "failures": 0})
    bad = [e for e in report["errors"] if not any(c in e["error"] for c in CAUSES)]
    checks.append(Check("failures name their cause", not bad and e2e["count"] > 0,
                        f"{e2e['failures']} of {e2e['count']} launches failed; "
                        + ("each names a worker or a host" if not bad else "these name neither: "
                           + "; ".join(f"{e['occurrences']} x {e['error'][-300:]}" for e in bad[:5]))))
    most = len(kills) * opts.users  # a kill can fail at most the launches running then
    checks.append(Check("others finish", e2e["failures"] <= most,
                        f"{e2e['failures']} failed launches over {len(kills)} kills; at most {most} were running"))
    back = [k for k in kills if k.restarted_after is not None]
    checks.append(Check("restarts", len(back) == len(kills) > 0,
                        f"{len(back)} of {len(kills)} killed actors came back: "
                        + ", ".join(f"{k.actor} {k.restarted_after:.1f} s" if k.restarted_after else f"{k.actor} never"
                                    for k in kills)))
    if final is None:
        checks.append(Check("pages", False, "the gateway did not answer Health after the load"))
    else:
        ok = final["running"] == 0 and final["free"] + final["cached"] == final["total"] and not final["books"]
        checks.append(Check("pages", ok, f"after the load: {final['running']} running, {final['free']} free + "
                                         f"{final['cached']} cached of {final['total']} pages; books: "
                                         f"{final['books'] or 'agree'}"))
    before = rate(points, 0.0, kills[0].at) if kills else None
    recovered = []
    for i, k in enumerate(kills):
        end = kills[i + 1].at if i + 1 < len(kills) else load_s
        if k.restarted_after is not None and end - opts.window >= k.at + k.restarted_after:
            recovered.append((k, rate(points, end - opts.window, end)))
    ratios = [r / before for _, r in recovered if r is not None and before]
    checks.append(Check("throughput recovers", bool(ratios) and min(ratios) >= opts.recovered,
                        f"{before or 0:.2f} launches/s before the first kill; in the last {opts.window:.0f} s "
                        "before the next kill or the end: "
                        + (", ".join(f"{r:.2f}x" for r in ratios) or "no window after a restart: run longer")
                        + f" (at least {opts.recovered:.2f}x)"))
    return checks


def settle(address: str, token: str | None, workers: dict, timeout_s: float) -> dict | None:
    """Once nothing runs and the workers' reported pages are all back: Health, and the page books."""
    import ray

    deadline = time.monotonic() + timeout_s
    with PieClient(address, token=token, timeout_s=10.0) as client:
        while True:
            try:
                h = client.health()
            except Exception:  # noqa: BLE001  restarting actors: try again
                h = None
            done = h is not None and h.running == 0 and h.free_pages + h.cached_pages == h.total_pages
            if done or time.monotonic() > deadline:
                break
            time.sleep(2.0)
    if h is None:
        return None
    books = []
    for name, handle in workers.items():
        if name.startswith("pie-worker"):
            try:
                ray.get(handle.check_idle.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001  its books disagree: the message says how
                books.append(f"{name}: {e}")
    try:
        ray.get(directory().check_invariants.remote(), timeout=30)
    except Exception as e:  # noqa: BLE001
        books.append(f"directory: {e}")
    return {"running": h.running, "free": h.free_pages, "cached": h.cached_pages, "total": h.total_pages,
            "books": "; ".join(books)}


def chart(points, kills: list[Kill], checks: list[Check], path: Path, bucket_s: float = 10.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    edges = [t for t, _ in points][::max(1, int(bucket_s))]
    counts = dict(points)
    rates = [(b - a, (counts[b] - counts[a]) / (b - a)) for a, b in zip(edges, edges[1:]) if b > a]
    ax.step([e for e in edges[1:len(rates) + 1]], [r for _, r in rates], where="pre", color="tab:blue",
            label=f"launches finished per second ({bucket_s:.0f} s buckets)")
    for k in kills:
        ax.axvline(k.at, color="tab:red", lw=1)
        if k.restarted_after:
            ax.axvspan(k.at, k.at + k.restarted_after, color="tab:red", alpha=0.12)
        ax.text(k.at, ax.get_ylim()[1], f" {k.actor.removeprefix('pie-')}", va="top", fontsize=7, rotation=90)
    verdict = "passed" if all(c.ok for c in checks) else "FAILED"
    ax.set_title(f"pie serve --ray under chaos: a kill (red line) and its restart (shaded): {verdict}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    say(f"chart: {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadtests/chaos.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=duration, default="6m", help="how long the load runs (default 6m)")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills (default 60)")
    ap.add_argument("--first-kill", type=float, default=60.0, help="seconds of load before the first (default 60)")
    ap.add_argument("--window", type=float, default=20.0,
                    help="seconds before each next kill whose throughput must have recovered (default 20)")
    ap.add_argument("--recovered", type=float, default=0.7,
                    help="the least fraction of the throughput before the first kill that counts (default 0.7)")
    ap.add_argument("--workers", type=int, default=2, help="worker actors (default 2)")
    ap.add_argument("--hosts", type=int, default=2, help="inferlet host actors (default 2)")
    ap.add_argument("--users", type=int, default=4, help="locust users, one launch at a time each (default 4)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens a launch generates (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="picks the victims (default 0)")
    ap.add_argument("--restart-timeout", type=float, default=180.0, help="seconds a killed actor may take to return")
    ap.add_argument("--server-args", default="--dtype fp32", help="extra arguments of `pie serve --ray`, one string")
    ap.add_argument("--out-dir", type=Path, default=None, help="chaos.json, locust's CSV files and the server log")
    ap.add_argument("--png", type=Path, default=None, help="draw throughput, kills and restarts here")
    opts = ap.parse_args(argv)
    load_s = seconds(opts.duration)
    if opts.first_kill >= load_s:
        ap.error("--first-kill must come before the end of --duration")
    out_dir = opts.out_dir or Path(tempfile.mkdtemp(prefix="pie-chaos-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    import ray

    say("starting a local Ray ...")
    gcs = start_ray()
    server = Server(["--ray", "--ray-address", gcs, "--workers", str(opts.workers), "--hosts", str(opts.hosts),
                     *shlex.split(opts.server_args)], out_dir / "server.log")
    locust = None
    try:
        wasm = build_component(TEXT, out_dir)
        wait_for_health(server.address, None, server, 600.0)
        upload(server.address, None, wasm)
        handles = actors(opts.workers, opts.hosts)
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "TextCompletionUser", "--headless",
               "--only-summary", "-u", str(opts.users), "-r", str(opts.users), "-t", opts.duration,
               "--host", server.address, "--csv", str(out_dir / "locust"), "--csv-full-history",
               "--samples-json", str(out_dir / "report.json"), "--wasm", str(wasm),
               "--max-tokens", str(opts.max_tokens)]
        say(f"running locust for {opts.duration} ({opts.users} users); a kill every {opts.kill_every:.0f} s "
            f"from {opts.first_kill:.0f} s ...")
        t0, t0_wall = time.monotonic(), time.time()
        locust = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PIE_TOKEN": ""})
        kills: list[Kill] = []
        next_kill = opts.first_kill
        while locust.poll() is None:
            now = time.monotonic() - t0
            if now >= next_kill and now < load_s - opts.window:
                name = rng.choice(sorted(handles))
                kills.append(kill_and_wait(name, handles[name], now, opts.restart_timeout))
                next_kill = now + opts.kill_every
            time.sleep(0.5)
        check_locust(locust.returncode)
        say("the load is over; waiting for the cluster to settle ...")
        final = settle(server.address, None, handles, 120.0)
        report = read_report(out_dir / "report.json")
        points = completions(out_dir / "locust_stats_history.csv", t0_wall)
    except SetupError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if locust is not None and locust.poll() is None:
            locust.terminate()
        say("stopping the server and Ray ...")
        server.stop()
        ray.shutdown()
    checks = judge(report, kills, points, load_s, opts, final)
    say("verdict:")
    passed = print_verdict(checks)
    (out_dir / "chaos.json").write_text(json.dumps(
        {"kills": [asdict(k) for k in kills], "completions": points, "checks": [asdict(c) for c in checks],
         "final": final, "requests": report["requests"], "errors": report["errors"],
         "args": sys.argv[1:] if argv is None else argv}, indent=1))
    if opts.png:
        chart(points, kills, checks, opts.png)
    say(f"chaos.json, locust's CSV files and the server log: {out_dir}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
