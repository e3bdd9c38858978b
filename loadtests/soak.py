"""Soak a pie server: a long locust run mixing normal clients with misbehaving ones, watching the
server's memory and KV pages; it fails on any normal request failing, memory growth past --max-growth
after the warm-up, or pages not back at the end.

    .venv/bin/python loadtests/soak.py [--duration 10m] [--warmup 60] [--window 60] [--max-growth 0.05]
                                       [--server-args="--dtype fp32"] [--out-dir DIR] [--png soak.png]

It starts `pie serve` with the OpenAI API (--http-port), builds text_completion and the test probe
(tests/inferlets/api_probe.py: the slow reader's flood and the hostile modes), and runs
loadtests/soak_users.py: normal gRPC launches and OpenAI chat streams, clients that leave mid-stream
(both APIs), slow readers of more than the outbox holds, and a hostile program every --hostile-every
seconds. Every --sample-every seconds it reads the server's resident memory (/proc, Linux) and its
Health (free, cached and running). Memory: the least RSS over the window after the warm-up is the
baseline, the least over the last window of load the end (the least: a hostile program's memory is
there and gone within seconds; a leak raises the floor). Pages: once the load stops and nothing runs,
free + cached (the prefix cache's, freed on demand) must be every page.

Writes samples.json (every sample and the verdict), locust's CSV files and the server log to --out-dir,
and a chart with --png. Exit status: 0 when every check passed, 1 when one failed, 2 when the test
could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import (ROOT, Check, PieClient, Server, SetupError, build_component, check_locust, duration,
                     print_verdict, read_report, say, seconds, upload, wait_for_health, wait_for_http)

TEXT = ROOT / "inferlets" / "examples" / "text_completion.py"
PROBE = ROOT / "tests" / "inferlets" / "api_probe.py"
USERS = ROOT / "loadtests" / "soak_users.py"
NORMAL = ("grpc e2e", "http e2e", "grpc slow_reader")  # must never fail
MISBEHAVING = ("grpc disconnect", "http disconnect", "hostile")  # must end as their users expect


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    free_pages: int
    cached_pages: int
    total_pages: int
    running: int


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no VmRSS for process {pid}")


class Sampler(threading.Thread):
    """Samples the server every `every` seconds until stopped; a failed Health is skipped and counted."""

    def __init__(self, pid: int, address: str, token: str | None, every: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.address, self.token, self.every = pid, address, token, every
        self.samples: list[Sample] = []
        self.missed = 0
        self.t0 = time.monotonic()
        self._stop_event = threading.Event()

    def sample(self, client: PieClient) -> Sample | None:
        try:
            h = client.health()
            s = Sample(time.monotonic() - self.t0, rss_mb(self.pid), h.free_pages, h.cached_pages, h.total_pages,
                       h.running)
        except Exception:  # noqa: BLE001  a busy server misses a beat; the count is reported
            self.missed += 1
            return None
        self.samples.append(s)
        return s

    def run(self) -> None:
        with PieClient(self.address, token=self.token, timeout_s=10.0) as client:
            while not self._stop_event.wait(self.every):
                self.sample(client)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)



def memory_check(samples: list[Sample], load_s: float, warmup_s: float, window_s: float,
                 max_growth: float) -> Check:
    """The floor of RSS over the window after the warm-up against the floor over the last window of load."""
    base = [s.rss_mb for s in samples if warmup_s <= s.t < warmup_s + window_s]
    end = [s.rss_mb for s in samples if load_s - window_s <= s.t <= load_s]
    if not base or not end or warmup_s + window_s > load_s - window_s:
        return Check("memory", False, f"too few samples to judge (baseline {len(base)}, end {len(end)}): run longer "
                                      f"than --warmup + 2 x --window ({warmup_s + 2 * window_s:.0f} s)")
    growth = min(end) / min(base) - 1
    return Check("memory", growth <= max_growth,
                 f"RSS floor {min(base):.0f} MB after the warm-up ({warmup_s:.0f}-{warmup_s + window_s:.0f} s), "
                 f"{min(end):.0f} MB in the last {window_s:.0f} s of load: {growth:+.1%} (limit {max_growth:+.0%}); "
                 f"peak {max(s.rss_mb for s in samples):.0f} MB")


def pages_check(final: Sample | None) -> Check:
    if final is None:
        return Check("pages", False, "the server did not answer Health after the load")
    back = final.free_pages + final.cached_pages
    return Check("pages", final.running == 0 and back == final.total_pages,
                 f"after the load: {final.running} running, {final.free_pages} free + {final.cached_pages} cached "
                 f"= {back} of {final.total_pages} pages")


def request_checks(report: dict) -> list[Check]:
    """Normal requests: none failed and some finished; each misbehaving kind: ran, and ended as expected."""
    checks = []
    requests = report["requests"]
    for key in (*NORMAL, *MISBEHAVING):
        rows = {k: v for k, v in requests.items() if k == key or (key == "hostile" and k.startswith("hostile "))}
        count = sum(r["count"] for r in rows.values())
        failures = sum(r["failures"] for r in rows.values())
        detail = f"{count} requests, {failures} failed"
        if key == "hostile":
            detail += " (" + ", ".join(f"{k.split(' ', 1)[1]} {r['count']}" for k, r in sorted(rows.items())) + ")"
        if failures:
            detail += ": " + "; ".join(f"{e['occurrences']} x {e['method']} {e['name']}: {e['error'][-300:]}"
                                       for e in report["errors"]
                                       if f"{e['method']} {e['name']}".startswith(key))[:2000]
        checks.append(Check(key, count > 0 and failures == 0, detail if count else "none ran: " + detail))
    return checks


def chart(samples: list[Sample], checks: list[Check], opts, load_s: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, (mem, pages) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    mem.plot(t, [s.rss_mb for s in samples], color="tab:blue", lw=1)
    for start, label in ((opts.warmup, "baseline"), (load_s - opts.window, "end")):
        mem.axvspan(start / 60, (start + opts.window) / 60, color="tab:green", alpha=0.12)
        mem.text(start / 60, mem.get_ylim()[1], f" {label}", va="top", fontsize=8)
    mem.set_ylabel("server RSS (MB)")
    verdict = "passed" if all(c.ok for c in checks) else "FAILED"
    mem.set_title(f"pie serve soak, {load_s / 60:.0f} min: {verdict}")
    pages.stackplot(t, [s.total_pages - s.free_pages - s.cached_pages for s in samples],
                    [s.cached_pages for s in samples], [s.free_pages for s in samples],
                    labels=["held by inferlets", "prefix cache", "free"],
                    colors=["tab:red", "tab:orange", "tab:green"], alpha=0.6)
    pages.set_ylabel("KV pages")
    pages.set_xlabel("minutes")
    pages.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    say(f"chart: {path}")


def run_locust(opts, server: Server, wasm: dict[str, Path], out_dir: Path) -> int:
    mix = {"TextCompletionUser": opts.users, "OpenAIChatUser": opts.openai_users,
           "DisconnectingUser": opts.drop_users, "OpenAIDropUser": opts.drop_users,
           "SlowReaderUser": opts.slow_readers, "HostileUser": opts.hostile_users}
    mix = {name: n for name, n in mix.items() if n}
    users = sum(mix.values())
    cmd = [sys.executable, "-m", "locust", "-f", str(USERS), *mix, "--headless", "--only-summary",
           "-u", str(users), "-r", str(users), "-t", opts.duration, "--host", server.http_url,
           "--grpc-host", server.address, "--csv", str(out_dir / "locust"), "--csv-full-history",
           "--samples-json", str(out_dir / "report.json"), "--wasm", str(wasm["text"]),
           "--probe-wasm", str(wasm["probe"]), "--max-tokens", str(opts.max_tokens),
           "--hostile-every", str(opts.hostile_every)]
    env = {**os.environ, "PIE_TOKEN": opts.token or "", "PIE_SOAK_MIX": ",".join(f"{k}={v}" for k, v in mix.items())}
    say(f"running locust for {opts.duration}: {', '.join(f'{v} {k}' for k, v in mix.items())} ...")
    say(" ".join(shlex.quote(a) for a in cmd[1:]))
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def settle(sampler: Sampler, timeout_s: float) -> Sample | None:
    """Wait for nothing to run (a hostile program may still be burning its fuel) and every page to be
    back (an ended inferlet's pages return as its last passes complete); the last sample."""
    deadline = time.monotonic() + timeout_s
    with PieClient(sampler.address, token=sampler.token, timeout_s=10.0) as client:
        while True:
            last = sampler.sample(client)
            if last is not None and last.running == 0 and last.free_pages + last.cached_pages == last.total_pages:
                return last
            if time.monotonic() > deadline:
                return last
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadtests/soak.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=duration, default="10m", help="how long the load runs (default 10m)")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline (default 60)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds each memory window spans (default 60)")
    ap.add_argument("--max-growth", type=float, default=0.05, help="memory growth allowed, a fraction (default 0.05)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples (default 2)")
    ap.add_argument("--users", type=int, default=2, help="normal gRPC launches at once (default 2)")
    ap.add_argument("--openai-users", type=int, default=1, help="normal OpenAI chat streams at once (default 1)")
    ap.add_argument("--drop-users", type=int, default=1, help="clients leaving mid-stream, per API (default 1)")
    ap.add_argument("--slow-readers", type=int, default=1, help="slow readers of a flood (default 1)")
    ap.add_argument("--hostile-users", type=int, default=1, help="hostile launchers (default 1)")
    ap.add_argument("--hostile-every", type=float, default=15.0, help="seconds between one's hostile launches")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens a normal request generates (default 32)")
    ap.add_argument("--server-args", default="--dtype fp32",
                    help="extra arguments of `pie serve`, one string (default: --dtype fp32)")
    ap.add_argument("--token", default=os.environ.get("PIE_TOKEN") or None, help="the server's token")
    ap.add_argument("--out-dir", type=Path, default=None, help="samples, locust's CSV and the server log")
    ap.add_argument("--png", type=Path, default=None, help="draw memory and pages over time here")
    opts = ap.parse_args(argv)
    load_s = seconds(opts.duration)
    if opts.warmup + 2 * opts.window > load_s:
        ap.error(f"--duration ({load_s:.0f} s) must cover --warmup + 2 x --window "
                 f"({opts.warmup + 2 * opts.window:.0f} s): the baseline and the end may not overlap")
    out_dir = opts.out_dir or Path(tempfile.mkdtemp(prefix="pie-soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    server = Server([*shlex.split(opts.server_args), *(["--token", opts.token] if opts.token else [])],
                    out_dir / "server.log", http=True)
    try:
        wasm = {"text": build_component(TEXT, out_dir), "probe": build_component(PROBE, out_dir)}
        wait_for_health(server.address, opts.token, server, 300.0)
        wait_for_http(server.http_url, opts.token, server, 300.0)
        for path in wasm.values():
            upload(server.address, opts.token, path)  # compiled now, not during the run
        sampler = Sampler(server.proc.pid, server.address, opts.token, opts.sample_every)
        sampler.start()
        check_locust(run_locust(opts, server, wasm, out_dir))
        sampler.stop()
        say("the load is over; waiting for the last inferlets to end ...")
        final = settle(sampler, 120.0)
        report = read_report(out_dir / "report.json")
    except SetupError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("stopping the server ...")
        server.stop()
    checks = [*request_checks(report),
              memory_check([s for s in sampler.samples if s.t <= load_s], load_s, opts.warmup, opts.window,
                           opts.max_growth),
              pages_check(final)]
    say(f"verdict ({len(sampler.samples)} samples, {sampler.missed} missed):")
    passed = print_verdict(checks)
    (out_dir / "samples.json").write_text(json.dumps(
        {"samples": [asdict(s) for s in sampler.samples], "checks": [asdict(c) for c in checks],
         "requests": report["requests"], "args": sys.argv[1:] if argv is None else argv}, indent=1))
    if opts.png:
        chart(sampler.samples, checks, opts, load_s, opts.png)
    say(f"samples.json, locust's CSV files and the server log: {out_dir}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
