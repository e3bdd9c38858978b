"""`pie serve --ray` as a process: it starts a local Ray on loopback, a worker actor, a host actor and
the gateway, and `pie submit` gets an answer through it; SIGTERM stops it and its Ray."""
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

START_TIMEOUT_S = 240


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
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
