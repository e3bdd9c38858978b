"""`pie serve --ray` as a process: it starts a local Ray on loopback, a worker actor, a host actor and
the gateway, and `pie submit` gets an answer through it; SIGTERM stops it and its Ray."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

START_TIMEOUT_S = 240


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time in clock ticks) of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def descendants(pid: int) -> dict[tuple[int, str], str]:
    """Every live process below `pid`, as (pid, start time) -> command line (the start time tells a
    process from a later one given the same pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if (stat := _stat(child)) is not None:
            found[(child, stat[2])] = command
    return found


def still_running(processes: dict[tuple[int, str], str]) -> dict[tuple[int, str], str]:
    """Those of `processes` that still run (a zombie has ended)."""
    return {(pid, start): command for (pid, start), command in processes.items()
            if (stat := _stat(pid)) is not None and stat[2] == start and stat[1] != "Z"}


def test_pie_serve_ray_answers_pie_submit(tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--ray", "--workers", "1",
                                 "--port", "0", "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=out, text=True)
    try:
        line, deadline = "", time.monotonic() + START_TIMEOUT_S
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        match = re.search(r"on (\S+:\d+)", line)
        if not match:
            pytest.fail(f"pie serve --ray printed no address; its stderr:\n{log.read_text()[-3000:]}")
        assert "1 Ray workers" in line
        submit = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--addr", match.group(1),
                                 "inferlets/examples/text_completion.py", "--metadata", "application=pie",
                                 "--prompt-hint", "<|im_start|>user", "--", "--prompt",
                                 "What is the capital of France?", "--max-tokens", "8"],
                                capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stderr
        assert "Paris" in submit.stdout
        ray_processes = descendants(proc.pid)  # its Ray: the GCS, the raylet, and the actors' workers
        commands = " ".join(ray_processes.values())
        assert all(name in commands for name in ("gcs_server", "raylet", "WorkerActor", "HostActor")), commands
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := still_running(ray_processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of its Ray outlived it: {sorted(left.values())}"
