"""init_local_ray retries the one Ray start failure seen here (the GCS never writes its port file)
and gives up on anything else at once. The failures are injected into ray.init on purpose."""
import pytest
import ray

from cluster.actors import cluster as cluster_mod

GCS_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")


def fake_init(monkeypatch, failures):
    calls = []

    def init(**options):
        calls.append(options)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(cluster_mod.time, "sleep", lambda s: None)
    return calls


def test_a_gcs_start_timeout_is_retried(monkeypatch, capsys):
    calls = fake_init(monkeypatch, [GCS_TIMEOUT])
    cluster_mod.init_local_ray(log_to_driver=False)
    assert len(calls) == 2 and calls[1]["address"] == "local" and calls[1]["log_to_driver"] is False
    assert "trying again" in capsys.readouterr().err


def test_retries_stop_after_the_last_attempt(monkeypatch):
    calls = fake_init(monkeypatch, [GCS_TIMEOUT] * cluster_mod.START_ATTEMPTS)
    with pytest.raises(RuntimeError, match="gcs_server_port"):
        cluster_mod.init_local_ray()
    assert len(calls) == cluster_mod.START_ATTEMPTS


def test_other_start_failures_are_not_retried(monkeypatch):
    calls = fake_init(monkeypatch, [RuntimeError("Maybe you called ray.init twice by accident?")])
    with pytest.raises(RuntimeError, match="twice"):
        cluster_mod.init_local_ray()
    assert len(calls) == 1


def test_a_node_startup_timeout_is_retried(monkeypatch):
    calls = fake_init(monkeypatch, [Exception("The current node timed out during startup. This could happen ...")])
    cluster_mod.init_local_ray()
    assert len(calls) == 2


TRAP_AFTER_RAY = """
import ray
import wasmtime
from cluster.runtime import fatal_signals  # records wasmtime's trap handlers (its first Engine installs them)
from cluster.actors.cluster import init_local_ray
engine = wasmtime.Engine()
store = wasmtime.Store(engine)
module = wasmtime.Module(engine, '(module (func (export "f") unreachable))')
init_local_ray(log_to_driver=False)  # installs Ray's crash handlers over wasmtime's
ray.shutdown()  # resets the signals to their defaults
print("replaced", sorted(fatal_signals.restore()))  # what the scheduler does before each round
try:
    wasmtime.Instance(store, module, []).exports(store)["f"](store)
except wasmtime.Trap:
    print("trapped")
"""


def test_a_guest_trap_after_ray_came_and_went_is_still_an_error():
    """Ray replaces wasmtime's trap handlers when it starts and resets them when it stops; the scheduler
    puts them back before each round (fatal_signals.restore), else the trap kills the process with
    SIGILL (exit code -4)."""
    import signal
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRAP_AFTER_RAY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "trapped" in done.stdout, (done.returncode, done.stderr[-2000:])
    assert str(int(signal.SIGILL)) in done.stdout.split("replaced", 1)[1]
