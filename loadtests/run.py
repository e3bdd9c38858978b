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
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cluster.api.grpc_client import PieClient, RequestFailed  # noqa: E402  (grpc and the stubs only)

EXAMPLE = ROOT / "inferlets" / "examples" / "text_completion.py"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
METRICS = ("ttft", "itl", "e2e")


class SetupError(Exception):
    """The test could not run; the message says why and what to do."""


def say(text: str) -> None:
    print(f"[loadtest] {text}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duration(text: str) -> str:
    """A run time in locust's syntax (90, 90s, 2m, 1h30m, 1m30s), checked here rather than by locust."""
    if not re.fullmatch(r"\d+|(?=\d)(\d+h)?(\d+m)?(\d+s)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 60s, 2m or 1m30s")
    return text


class Server:
    """`pie serve` as a subprocess, its stdout and stderr in one log file."""

    def __init__(self, extra_args: list[str], log: Path, http: bool = False):
        self.address = f"127.0.0.1:{free_port()}"
        self.log = log
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", self.address.rsplit(":", 1)[1], *extra_args]
        self.http_url = None
        if http:
            port = free_port()
            cmd += ["--http-port", str(port)]
            self.http_url = f"http://127.0.0.1:{port}"
        say(f"starting the server: pie {' '.join(shlex.quote(a) for a in cmd[3:])} (log: {log})")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def exited(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            say(f"the server did not stop within 30 s of SIGTERM; killing it (log: {self.log})")
            self.proc.kill()
            self.proc.wait(10)


def build_component(out_dir: Path) -> Path:
    wasm = out_dir / "text_completion.wasm"
    say(f"building {EXAMPLE.relative_to(ROOT)} (cached by content; a first build takes 10-20 s) ...")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "build", str(EXAMPLE), "-o", str(wasm)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"building {EXAMPLE} failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
    say(f"built {wasm} in {time.monotonic() - t0:.1f} s")
    return wasm


def wait_for_health(address: str, token: str | None, server: Server | None, timeout_s: float) -> None:
    """Poll Health until it answers; fail early when the server process exits or refuses us."""
    t0 = time.monotonic()
    last_note = t0
    last_error = ""
    with PieClient(address, token=token, timeout_s=2.0) as client:
        while True:
            try:
                h = client.health()
                say(f"the server at {address} answers after {time.monotonic() - t0:.1f} s: {h.status}, "
                    f"model {h.model}, {h.free_pages}/{h.total_pages} KV pages free, {h.running} running")
                return
            except RequestFailed as e:
                if e.code.name == "UNAUTHENTICATED":
                    raise SetupError(f"the server at {address} wants a token: {e}") from None
                last_error = str(e)
            now = time.monotonic()
            if server is not None and server.exited() is not None:
                raise SetupError(f"the server exited with status {server.exited()} before answering Health; "
                                 f"the end of its log ({server.log}):\n{tail(server.log)}")
            if now - t0 > timeout_s:
                where = f"; the end of its log ({server.log}):\n{tail(server.log)}" if server is not None else ""
                raise SetupError(f"the server at {address} did not answer Health within {timeout_s:.0f} s "
                                 f"(last error: {last_error}){where}")
            if now - last_note >= 5:
                last_note = now
                why = "; it loads the model first" if server is not None else ""
                say(f"waiting for the server at {address} to answer Health ({now - t0:.0f} s{why}) ...")
            time.sleep(0.5)


def wait_for_http(url: str, token: str | None, server: Server | None, timeout_s: float) -> None:
    """Poll GET /v1/models until the OpenAI API answers (it starts after the gRPC API: the server
    builds its inferlet first)."""
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {token or 'none'}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                model = json.loads(response.read())["data"][0]["id"]
            say(f"the OpenAI API at {url} answers after {time.monotonic() - t0:.1f} s: model {model}")
            return
        except urllib.error.HTTPError as e:
            raise SetupError(f"GET {url}/v1/models answered {e.code}: {e.read()[:200]!r}") from None
        except (OSError, ValueError, KeyError, IndexError) as e:
            last_error = e
        if server is not None and server.exited() is not None:
            raise SetupError(f"the server exited with status {server.exited()}; the end of its log ({server.log}):\n"
                             f"{tail(server.log)}")
        if time.monotonic() - t0 > timeout_s:
            raise SetupError(f"the OpenAI API at {url} did not answer within {timeout_s:.0f} s (last error: "
                             f"{last_error})")
        time.sleep(0.5)


def upload(address: str, token: str | None, wasm: Path) -> None:
    """Upload once before the test: the server compiles a new component (~5 s), outside the measured run."""
    t0 = time.monotonic()
    try:
        with PieClient(address, token=token) as client:
            program = client.upload(wasm)
    except RequestFailed as e:
        raise SetupError(f"uploading {wasm} failed: {e}") from None
    say(f"uploaded the component as {program[:12]}... in {time.monotonic() - t0:.1f} s")


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


def read_report(path: Path) -> dict:
    if not path.exists():
        raise SetupError(f"locust wrote no {path}: see its output above")
    return json.loads(path.read_text())


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
        wasm = None if openai else opts.wasm or build_component(out_dir)  # while the server loads its model
        if server is not None or not openai:
            wait_for_health(server.address if server else opts.addr, opts.token, server,
                            opts.ready_timeout if server else 10.0)
        if not openai:
            upload(opts.addr or server.address, opts.token, wasm)
        address = opts.addr or (server.http_url if openai else server.address)
        if openai:
            wait_for_http(address, opts.token, server, opts.ready_timeout if server else 10.0)
        rc = run_locust(opts, address, wasm, prefix, out_dir / "samples.json")
        if rc not in (0, 1):  # 1: some requests failed, which the report says
            raise SetupError(f"locust exited with status {rc}: see its output above")
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
