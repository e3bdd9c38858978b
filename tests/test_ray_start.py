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
