"""What the load tests share (loadtests/run.py, soak.py, chaos.py): a `pie serve` subprocess, building
and uploading a component, waiting for the server to answer, and the run-time syntax locust takes.

Imported by the drivers only (never by a locustfile): it imports grpc and the client stubs, nothing heavy.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cluster.api.grpc_client import PieClient, RequestFailed  # noqa: E402  (grpc and the stubs only)

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


def seconds(text: str) -> float:
    """A locust run time (90, 90s, 2m, 1h30m) in seconds."""
    if text.isdigit():
        return float(text)
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([hms])", text)))


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


def build_component(source: Path, out_dir: Path) -> Path:
    wasm = out_dir / f"{source.stem}.wasm"
    say(f"building {source.relative_to(ROOT)} (cached by content; a first build takes 10-20 s) ...")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "build", str(source), "-o", str(wasm)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"building {source} failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
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


def upload(address: str, token: str | None, wasm: Path) -> str:
    """Upload once before the test: the server compiles a new component (~5 s), outside the measured run."""
    t0 = time.monotonic()
    try:
        with PieClient(address, token=token) as client:
            program = client.upload(wasm)
    except RequestFailed as e:
        raise SetupError(f"uploading {wasm} failed: {e}") from None
    say(f"uploaded {wasm.name} as {program[:12]}... in {time.monotonic() - t0:.1f} s")
    return program


def check_locust(rc: int) -> None:
    """locust's exit status: 0, or 1 when some requests failed (the report says which); else it did not run."""
    if rc not in (0, 1):
        raise SetupError(f"locust exited with status {rc}: see its output above")


def read_report(path: Path) -> dict:
    """The samples JSON locust wrote on quitting (loadtests/locustfile.py, --samples-json)."""
    if not path.exists():
        raise SetupError(f"locust wrote no {path}: see its output above")
    return json.loads(path.read_text())


@dataclass
class Check:
    """One line of a soak's or a chaos run's verdict."""

    name: str
    ok: bool
    detail: str


def print_verdict(checks: list[Check]) -> bool:
    """Print each check, aligned; whether all passed."""
    width = max(len(c.name) for c in checks) + 1
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<{width}} {c.detail}")
    return all(c.ok for c in checks)
