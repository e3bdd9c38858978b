"""Agents that call tools over HTTP from inside their inferlet: the ReAct example against a real
local tool server (sharing its instructions' KV, dropping what it read), and a hundred agents
waiting on a slow tool at once, queued by the host's HTTP pool rather than refused."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from cluster.runtime.inferlet_host import InferletHost
from cluster.services.http_client import HttpPolicy
from helpers import http_reply, http_server, settled

ROOT = Path(__file__).resolve().parent.parent
REACT = ROOT / "inferlets" / "examples" / "agents" / "react.py"
HTTP_WAIT = ROOT / "tests" / "inferlets" / "http_wait.py"
SLOW_S = 0.5


class _Tool(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append(body)
        http_reply(self, 200, f"The search for {body['input'][:40]!r} found: the Eiffel Tower is in Paris, "
                              f"France.".encode())

    def do_GET(self):
        with self.server.lock:
            self.server.waiting += 1
            self.server.most_waiting = max(self.server.most_waiting, self.server.waiting)
        time.sleep(SLOW_S)
        with self.server.lock:
            self.server.waiting -= 1
        http_reply(self, 200, b"slow answer")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def tool():
    with http_server(_Tool, calls=[], lock=threading.Lock(), waiting=0, most_waiting=0) as server:
        yield server


@pytest.fixture(scope="module")
def host(_executor_fp32, tool):
    policy = HttpPolicy(allowed_hosts=(f"127.0.0.1:{tool.server_address[1]}",))
    with InferletHost(_executor_fp32, http_policy=policy) as host:
        yield host
        settled(host)
        host.worker.pages.check_idle()


def test_react_calls_its_tool_every_round_and_shares_its_instructions(host, tool):
    url = f"http://127.0.0.1:{tool.server_address[1]}/search"
    before = len(tool.calls)
    args = ["--tool", url, "--rounds", "3", "--max-tokens", "16", "--share", "react-instructions"]
    first = host.launch(REACT, args)
    second = host.launch(REACT, args + ["--question", "What is the capital of France?"])
    outcomes = [first.wait(300), second.wait(300)]
    for outcome in outcomes:
        assert outcome.ok, outcome.error
        events = [json.loads(m) for m in outcome.messages]
        rounds = [e for e in events if "round" in e]
        assert events[-1].keys() == {"answer"} and len(rounds) + 1 == len(events)
        assert all("Eiffel Tower is in Paris" in e["observation"] for e in rounds)
    made = sum(len(o.messages) - 1 for o in outcomes)
    assert len(tool.calls) - before == made and made > 0  # one POST per round, as the agents reported
    assert all(set(c) == {"tool", "input"} for c in tool.calls[before:])


def test_a_host_not_allowed_is_refused(host):
    outcome = host.run(REACT, ["--tool", "http://localhost:1/search", "--rounds", "1", "--max-tokens", "4"])
    assert not outcome.ok and "not allowed" in outcome.error


def test_a_hundred_agents_waiting_on_a_slow_tool_all_finish(host, tool):
    url = f"http://127.0.0.1:{tool.server_address[1]}/slow"
    host.component(HTTP_WAIT)
    t0 = time.monotonic()
    running = [host.launch(HTTP_WAIT, [url]) for _ in range(100)]
    outcomes = [r.wait(120) for r in running]
    took = time.monotonic() - t0
    assert all(o.ok and o.messages == ["slow answer"] for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
    # the pool ran many at once (64 by default) and queued the rest: none refused, none one by one
    assert tool.most_waiting > 8, tool.most_waiting
    print(f"[test_agents] 100 agents on a {SLOW_S} s tool: {took:.1f} s, at most {tool.most_waiting} waiting at once")
