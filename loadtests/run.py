"""Load-test a pie server with locust for a bounded time and print TTFT / ITL / end-to-end latency.

    .venv/bin/python loadtests/run.py [--api grpc|openai] [--users 4] [--duration 60s] [--max-tokens 32]
                                      [--server-args="--dtype fp32"] [--addr HOST:PORT] [--out-dir DIR]

By default it starts `pie serve --port <a free port>` (plus --server-args), builds the text_completion
inferlet while the model loads, waits for the server's Health, uploads the component once (the server
compiles it), runs `locust -f loadtests/locustfile.py --headless` in its own process, prints locust's
summary and a compact one of ttft / itl / e2e, and stops the server. With --addr it targets a server
that is already running instead. locust's CSV files and the server's log go to --out-dir.

With --api openai the users send streaming chat completions to the OpenAI API instead (the server is
started with --http-port; nothing is built or uploaded; --addr is then the HTTP base, http://HOST:PORT).

Exit status: 0 when every request succeeded, 1 when any failed (or none finished), 2 when the test
could not run (the build failed, the server did not come up, locust did not start).

This process never imports torch or locust: the server and locust each run in their own process.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import (ROOT, Server, SetupError, build_component, check_locust, duration, read_report, say, upload,
                     wait_for_health, wait_for_http)

EXAMPLE = ROOT / "inferlets" / "examples" / "text_completion.py"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
METRICS = ("ttft", "itl", "e2e")


def run_locust(opts, address: str, wasm: Path | None, prefix: Path, report: Path) -> int:
    user = "OpenAIChatUser" if opts.api == "openai" else "TextCompletionUser"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user, "--headless", "--only-summary",
           "-u", str(opts.users), "-r", str(opts.spawn_rate or opts.users), "-t", opts.duration,
           "--host", address, "--csv", str(prefix), "--samples-json", str(report),
           "--max-tokens", str(opts.max_tokens)]
    if wasm is not None:
        cmd += ["--wasm", str(wasm)]
    if opts.no_ignore_eos:
        cmd.append("--no-ignore-eos")
    env = {**os.environ, "PIE_TOKEN": opts.token or ""}  # the token goes by environment, not on the command line
    say(f"running locust for {opts.duration}: {opts.users} users, {opts.max_tokens} tokens per launch ...")
    say(" ".join(shlex.quote(a) for a in cmd[1:]))
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def summarize(report: dict, csv_prefix: Path) -> int:
    """Print ttft / itl / e2e (count, median, p95, mean, max over the successful samples); return the
    number of failed requests."""
    run_s = max(report["run_s"], 1e-9)
    say(f"summary ({run_s:.0f} s of load; milliseconds, exact over every sample; locust's tables round):")
    print(f"  {'metric':<7}{'count':>8}{'median':>9}{'p95':>9}{'mean':>9}{'max':>9}")
    for name in METRICS:
        ms = sorted(report["samples_ms"].get(name, []))
        if not ms:
            print(f"  {name:<7}{0:>8}  (no samples)")
            continue
        print(f"  {name:<7}{len(ms):>8}{statistics.median(ms):>9.1f}{percentile(ms, 0.95):>9.1f}"
              f"{statistics.fmean(ms):>9.1f}{ms[-1]:>9.1f}")
    finished = len(report["samples_ms"].get("e2e", []))
    messages = sum(len(report["samples_ms"].get(n, [])) for n in ("ttft", "itl"))
    failures = report["failures"]
    print(f"  launches finished: {finished} ({finished / run_s:.2f}/s); messages streamed: {messages} "
          f"({messages / run_s:.1f}/s, about one a token); failed requests: {failures}")
    if failures:
        say(f"{failures} requests failed (all of them: {csv_prefix}_failures.csv):")
        for e in report["errors"][:10]:
            print(f"  {e['occurrences']} x {e['name']}: {e['error'][-1500:]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--api", choices=["grpc", "openai"], default="grpc",
                    help="grpc: launch text_completion over the client API (default); openai: streaming chat "
                         "completions over the OpenAI API")
    ap.add_argument("--users", type=int, default=4, help="concurrent locust users, each one launch at a time (default 4)")
    ap.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    ap.add_argument("--duration", type=duration, default="60s", help="how long locust runs, e.g. 60s, 2m (default 60s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each launch generates (default 32)")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let launches stop at the end of turn")
    ap.add_argument("--addr", default=None, help="HOST:PORT of a running server (default: start `pie serve`)")
    ap.add_argument("--server-args", default="", help="extra arguments of `pie serve`, one string: --server-args=\"--dtype fp32\" (with '=')")
    ap.add_argument("--token", default=os.environ.get("PIE_TOKEN") or None, help="the server's token (default: $PIE_TOKEN)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for Health (default 300)")
    ap.add_argument("--wasm", type=Path, default=None, help="a built text_completion component (default: build it)")
    ap.add_argument("--out-dir", type=Path, default=None, help="locust's CSV files and the server log (default: a temp dir)")
    opts = ap.parse_args(argv)
    if opts.users < 1 or opts.max_tokens < 1:
        ap.error("--users and --max-tokens must be at least 1")
    out_dir = opts.out_dir or Path(tempfile.mkdtemp(prefix="pie-loadtest-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "locust"

    server = None
    try:
        openai = opts.api == "openai"
        if opts.addr is None:
            server = Server(shlex.split(opts.server_args), out_dir / "server.log", http=openai)
        wasm = None if openai else opts.wasm or build_component(EXAMPLE, out_dir)  # while the server loads its model
        if server is not None or not openai:
            wait_for_health(server.address if server else opts.addr, opts.token, server,
                            opts.ready_timeout if server else 10.0)
        if not openai:
            upload(opts.addr or server.address, opts.token, wasm)
        address = opts.addr or (server.http_url if openai else server.address)
        if openai:
            wait_for_http(address, opts.token, server, opts.ready_timeout if server else 10.0)
        rc = run_locust(opts, address, wasm, prefix, out_dir / "samples.json")
        check_locust(rc)
        report = read_report(out_dir / "samples.json")
        failures = summarize(report, prefix)
    except SetupError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if server is not None:
            say("stopping the server ...")
            server.stop()
    say(f"locust's CSV files, samples.json and the server log: {out_dir}")
    if failures or not report["samples_ms"]["e2e"]:
        say("FAILED: " + (f"{failures} requests failed" if failures else "no launch finished within the run; "
                          "lengthen --duration or lower --max-tokens"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
