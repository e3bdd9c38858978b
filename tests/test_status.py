"""Observability on a live embedded server (fp32, real gRPC and HTTP over loopback): /metrics parses
with prometheus_client's own parser and its counters move by what the test did; /status.json lists a
running inferlet and then not, and its pages; both want the token; the status page renders a running
inferlet and a worker's chart in a real headless Chromium (skipped, saying why, where none is
installed: `make test` installs Debian's where it can)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cluster.api.grpc_client import Finished, Message, PieClient
from cluster.api.grpc_server import InferletService, serve_service
from cluster.api.openai_http import serve_openai
from cluster.api.program_store import ProgramStore
from cluster.runtime.inferlet_build import build
from cluster.runtime.inferlet_host import InferletHost
from helpers import settled, wait_until

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "inferlets" / "examples" / "text_completion.py"
ECHO = ROOT / "tests" / "inferlets" / "echo.py"
TOKEN = "status-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(_executor_fp32, tmp_path_factory):
    """(gRPC client, HTTP base, program ids) of one embedded server with a token."""
    with InferletHost(_executor_fp32) as host:
        service = InferletService(host, ProgramStore(tmp_path_factory.mktemp("programs")))
        grpc_server = serve_service(service, port=0, token=TOKEN)
        http = serve_openai(service, port=0, token=TOKEN)
        try:
            with PieClient(grpc_server.target, token=TOKEN) as client:
                programs = {name: client.upload(build(path)) for name, path in (("text", TEXT), ("echo", ECHO))}
                yield client, http.url.removesuffix("/v1"), programs
        finally:
            http.stop()
            grpc_server.stop(0)
            settled(host)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client: (name, sorted labels) -> value."""
    response = requests.get(f"{base}/metrics", headers=AUTH, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happened(server):
    client, base, programs = server
    before = scrape(base)
    events = list(client.launch(programs["text"], ["--prompt", "What is the capital of France?", "--max-tokens", "6",
                                                   "--ignore-eos"]))
    assert isinstance(events[-1], Finished)
    messages = sum(isinstance(e, Message) for e in events)
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once upon a time", "max_tokens": 5, "stream": True, "ignore_eos": True}
    with requests.post(f"{base}/v1/completions", json=body, headers=AUTH, stream=True, timeout=60) as r:
        assert r.status_code == 200 and b"[DONE]" in b"".join(r.iter_lines())
    wait_until(lambda: value(scrape(base), "pie_inferlets_running") == 0, 10, "both inferlets to end")
    after = scrape(base)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert moved("pie_inferlets_launched_total", api="grpc") == 1
    assert moved("pie_inferlets_launched_total", api="openai") == 1
    assert moved("pie_inferlets_ended_total", cause="finished") == 2
    assert moved("pie_launch_seconds_count") == 2 and moved("pie_launch_seconds_sum") > 0
    assert moved("pie_time_to_first_token_seconds_count", api="grpc") == 1
    assert moved("pie_inter_token_latency_seconds_count", api="grpc") == messages - 1
    assert moved("pie_time_to_first_token_seconds_count", api="openai") == 1
    assert moved("pie_inter_token_latency_seconds_count", api="openai") >= 1
    decode = moved("pie_tokens_total", phase="decode")
    assert decode >= 6 + 4 and moved("pie_tokens_total", phase="prefill") > 10  # each prompt's prefill, then decode
    steps = moved("pie_step_seconds_count")
    assert steps > 0 and moved("pie_step_passes_count") == steps and moved("pie_step_seconds_sum") > 0
    assert moved("pie_step_passes_sum") >= decode / 4  # passes over the steps: each decode step is a pass of one
    assert moved("pie_handler_calls_total", call="submit") > 0 and moved("pie_handler_calls_total", call="allocate") > 0
    pages = {labels: v for (name, labels), v in after.items() if name == "pie_kv_pages"}
    total = pages[(("state", "total"), ("worker", "worker-0"))]
    free, cached = pages[(("state", "free"), ("worker", "worker-0"))], pages[(("state", "cached"), ("worker", "worker-0"))]
    assert free + cached + pages[(("state", "held"), ("worker", "worker-0"))] == total > 0


def test_status_json_lists_a_running_inferlet_and_then_not(server):
    client, base, programs = server
    stream = client.launch(programs["echo"], ["3"])  # holds 3 KV pages while it waits
    events = iter(stream)
    instance = next(events).instance_id
    assert next(events).text == "ready, holding 3 pages"
    status = requests.get(f"{base}/status.json", headers=AUTH, timeout=10).json()
    [mine] = [x for x in status["inferlets"] if x["id"] == instance]
    assert mine["pages"] == 3 and mine["api"] == "grpc" and programs["echo"].startswith(mine["program"])
    assert mine["state"] == "waiting" and mine["tokens"] == 0  # in receive(), no pass submitted
    [worker] = status["workers"]
    assert worker["id"] == "worker-0" and worker["pages"]["total"] > worker["pages"]["free"]
    assert worker["steps"] and all(len(s) == 4 for s in worker["steps"])
    client.terminate(instance)
    list(events)
    wait_until(lambda: not requests.get(f"{base}/status.json", headers=AUTH, timeout=10).json()["inferlets"], 10,
               "the echo to leave the status")
    after = requests.get(f"{base}/status.json", headers=AUTH, timeout=10).json()
    assert after["ended"]["stopped"] >= 1 and "ready" not in str(after)  # no message text anywhere


def test_metrics_and_status_want_the_token_and_the_page_needs_none(server):
    _, base, _ = server
    for path in ("/metrics", "/status.json"):
        assert requests.get(f"{base}{path}", timeout=10).status_code == 401
        assert requests.get(f"{base}{path}", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    page = requests.get(f"{base}/", timeout=10)
    assert page.status_code == 200 and "status.json" in page.text and "<canvas" not in page.text  # drawn by script


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium here: `make test` installs Debian's chromium when it "
                                                "runs as root with apt; or apt-get install chromium")
def test_the_status_page_renders_a_running_inferlet_and_a_workers_chart_in_a_browser(server, tmp_path):
    client, base, programs = server
    stream = client.launch(programs["echo"], ["2"])
    events = iter(stream)
    instance = next(events).instance_id
    next(events)
    try:
        dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000",
                              "--dump-dom", f"{base}/?token={TOKEN}"], capture_output=True, text=True, timeout=120)
    finally:
        client.terminate(instance)
        list(events)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert instance in html, html[-3000:]  # the running inferlet's row, filled in from /status.json
    assert 'class="worker worker-worker-0"' in html and "<canvas" in html  # its worker and the step chart
    assert "KV pages" in html and '<span class="error">' not in html  # the fetch worked


def test_the_grafana_dashboard_queries_only_metrics_the_server_exports():
    """deploy/grafana-dashboard.json: every pie_* name in its queries is one of ours (a counter's
    _total, a histogram's _bucket / _sum / _count, a gauge as it is, or the KV-page gauges)."""
    import json
    import re

    from cluster import metrics

    exported = {"pie_kv_pages"}
    for family in metrics.REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported |= {family.name + s for s in suffixes}
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    named = {name for q in queries for name in re.findall(r"\bpie_[a-z_]+", q)}
    assert len(dashboard["panels"]) >= 12 and named and named <= exported, sorted(named - exported)
