"""The load test (`make loadtest`, loadtests/run.py) end to end, briefly: a real `pie serve` process and
locust in its own process, 2 users for 12 s, 8 tokens a launch (40-60 s on 2 cores, the first build and
weight conversion of a fresh cache included)."""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "ray")


@pytest.mark.parametrize("locustfile", ["locustfile.py", "soak_users.py"])
def test_the_locustfiles_import_neither_torch_nor_ray(locustfile):
    """locust's gevent monkey-patching breaks ssl beside them (../shared/FACTS.md)."""
    code = (f"import runpy, sys; sys.path.insert(0, 'loadtests'); runpy.run_path('loadtests/{locustfile}'); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("api", ["grpc", "openai"])
def test_a_short_load_test_records_ttft_itl_and_e2e_without_failures(tmp_path, api):
    cmd = [sys.executable, "loadtests/run.py", "--api", api, "--users", "2", "--duration", "12s", "--max-tokens", "8",
           "--out-dir", str(tmp_path)]
    # its own session: on a timeout the driver, its server and locust are all stopped
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PIE_TOKEN": ""}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the load test ran past 240 s; its output:\n{output[-4000:]}") from None
    assert proc.returncode == 0, output[-4000:]

    with open(tmp_path / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("ttft", "itl", "e2e"):
        assert int(rows[name]["Request Count"]) > 0, (name, output[-3000:])
        assert int(rows[name]["Failure Count"]) == 0, (name, output[-3000:])
    assert int(rows["Aggregated"]["Failure Count"]) == 0

    report = json.loads((tmp_path / "samples.json").read_text())
    samples = report["samples_ms"]
    assert report["failures"] == 0 and report["errors"] == []
    assert len(samples["ttft"]) >= len(samples["e2e"]) > 0  # a launch cut off by the end has a ttft, no e2e
    assert len(samples["itl"]) >= len(samples["e2e"])  # 8 tokens: several messages per launch
    assert all(0 < t < e for t, e in zip(sorted(samples["ttft"]), sorted(samples["e2e"])))
    assert "failed requests: 0" in output and "stopping the server" in output
