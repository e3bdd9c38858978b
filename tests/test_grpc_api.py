"""The client gRPC API over real gRPC on loopback, in front of a real host and the real model.

One server per module over one InferletHost on the session's fp32 executor; a few more small
servers (a token, tiny limits) share that host. Every test must leave every KV page free.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
import wasmtime

from cluster.api.grpc_client import Failed, Finished, Message, PieClient, RequestFailed, Started, Uploaded
from cluster.api.grpc_server import serve
from cluster.runtime.inferlet_build import build
from cluster.runtime.inferlet_host import InferletHost
from cluster.api.program_store import ProgramStore, program_id_of
from helpers import http_reply, http_server, recording_uploads, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "inferlets" / "examples" / "text_completion.py"
REACT = ROOT / "inferlets" / "examples" / "agents" / "react.py"
ECHO = ROOT / "tests" / "inferlets" / "echo.py"
PROBE = ROOT / "tests" / "inferlets" / "api_probe.py"
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to bake bread."


def collect(stream) -> tuple[list[str], Finished | Failed]:
    """(messages, terminal event) of a launch stream, checking its shape: Started, Message*, one end."""
    events = list(stream)
    assert isinstance(events[0], Started) and events[0].instance_id
    assert all(isinstance(e, Message) for e in events[1:-1]), events
    assert isinstance(events[-1], (Finished, Failed)), events[-1]
    return [e.text for e in events[1:-1]], events[-1]


def next_message(events) -> str:
    event = next(events)
    assert isinstance(event, Message), event
    return event.text


@pytest.fixture(scope="module")
def host(_executor_fp32):
    with InferletHost(_executor_fp32) as host:
        yield host


@pytest.fixture(scope="module")
def server(host):
    server = serve(host, port=0)
    yield server
    server.stop()
    assert server.service.List(None, None).inferlets == []


@pytest.fixture(scope="module")
def client(server):
    with PieClient(server.target) as client:
        yield client


@pytest.fixture(scope="module")
def wasm() -> dict[str, bytes]:
    """The test inferlets' components (built once, cached by content)."""
    return {name: build(path).read_bytes() for name, path in
            (("text_completion", EXAMPLE), ("echo", ECHO), ("probe", PROBE))}


@pytest.fixture(scope="module")
def programs(client, wasm) -> dict[str, str]:
    return {name: client.upload(data) for name, data in wasm.items()}


@pytest.fixture(autouse=True)
def no_pages_leak(_executor_fp32):
    """Each test ends with every page it took back on the free list (ending inferlets release theirs
    as their last passes complete, so wait a bounded while)."""
    free = _executor_fp32.num_free_pages
    yield
    wait_until(lambda: _executor_fp32.num_free_pages == free, 60, "all KV pages back on the free list")
    _executor_fp32.check_idle_invariant()


def test_an_upload_is_named_by_its_digest_and_a_second_one_sends_only_the_digest(client, wasm, programs,
                                                                                 monkeypatch):
    data = wasm["echo"]
    assert programs["echo"] == program_id_of(data)
    sent = recording_uploads(client, monkeypatch)
    assert client.upload_program(data) == Uploaded(programs["echo"], len(data), already_present=True)
    assert [(c.sha256, c.total_size, len(c.data)) for c in sent] == [(programs["echo"], len(data), 0)], \
        "a second upload sent more than the digest"
    sent.clear()
    # no declared digest: all bytes sent, same id, and the server says it held them
    assert client.upload_program(data, sha256="") == Uploaded(programs["echo"], len(data), already_present=True)
    assert sum(len(c.data) for c in sent) == len(data)


def test_a_first_upload_asks_with_the_digest_then_sends_the_bytes(host, wasm, tmp_path, monkeypatch):
    fresh = serve(host, port=0, store=ProgramStore(tmp_path))
    try:
        with PieClient(fresh.target) as client:
            sent = recording_uploads(client, monkeypatch)
            data = wasm["echo"]
            assert client.upload_program(data) == Uploaded(program_id_of(data), len(data), already_present=False)
            assert len(sent[0].data) == 0 and sent[0].sha256 == program_id_of(data)  # the question: held?
            assert sum(len(c.data) for c in sent[1:]) == len(data)  # no: then the bytes, once
    finally:
        fresh.stop()


def test_many_inferlets_at_once(client, programs):
    args = ["--prompt", QUESTION, "--max-tokens", "12"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: collect(client.launch(programs["text_completion"], args)), range(8)))
    for messages, end in results:
        assert isinstance(end, Finished), end
        assert "Paris" in "".join(messages)
    assert client.health().running == 0


def test_messages_stream_while_the_inferlet_runs(client, programs):
    stream = client.launch(programs["text_completion"], ["--prompt", STORY, "--max-tokens", "40"])
    events = iter(stream)
    started = next(events)
    first = next_message(events)
    listed = {i.instance_id: i for i in client.list()}
    assert started.instance_id in listed  # the first message came before the end
    assert listed[started.instance_id].program_id == programs["text_completion"]
    rest = list(events)
    assert isinstance(rest[-1], Finished) and len(rest) > 10
    assert first and all(isinstance(e, Message) for e in rest[:-1])
    assert started.instance_id not in {i.instance_id for i in client.list()}


def test_send_and_receive(client, programs):
    stream = client.launch(programs["echo"])
    events = iter(stream)
    instance = next(events).instance_id
    assert next_message(events) == "ready, holding 0 pages"
    t0 = time.perf_counter()
    for i in range(20):
        client.send(instance, f"ping {i}")
        assert next_message(events) == f"ping {i}"
    print(f"\nsend -> echoed message round trip: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    with pytest.raises(RequestFailed) as too_large:
        client.send(instance, "x" * (65 << 10))
    assert too_large.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in str(too_large.value)
    client.send(instance, "quit")
    assert isinstance(next(events), Finished)
    with pytest.raises(RequestFailed) as ended:
        client.send(instance, "too late")
    assert ended.value.code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in str(ended.value)


def test_unknown_instances_and_programs_are_not_found(client):
    for call in (lambda: client.send("inferlet-424242", "hi"), lambda: client.terminate("inferlet-424242"),
                 lambda: list(client.launch("0" * 64)), lambda: list(client.launch("not-an-id"))):
        with pytest.raises(RequestFailed) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "upload it first" in str(e.value) or "started` event" in str(e.value)


def test_terminate_mid_generation(client, programs, _executor_fp32):
    stream = client.launch(programs["text_completion"], ["--prompt", STORY, "--max-tokens", "400"])
    events = iter(stream)
    instance = next(events).instance_id
    next_message(events), next_message(events)
    client.terminate(instance)
    rest = list(events)
    assert all(isinstance(e, Message) for e in rest[:-1]) and len(rest) < 100
    assert isinstance(rest[-1], Failed) and "terminated by its client" in rest[-1].error


def test_a_cancelled_stream_stops_its_inferlet(client, programs):
    stream = client.launch(programs["text_completion"], ["--prompt", STORY, "--max-tokens", "400"])
    events = iter(stream)
    instance = next(events).instance_id
    next_message(events)
    stream.cancel()
    assert all(isinstance(e, Message) for e in events)  # our own cancel ends the iteration quietly
    wait_until(lambda: instance not in {i.instance_id for i in client.list()}, 30, "the inferlet stopping")


def test_a_client_that_goes_away_loses_its_inferlet_and_pages(server, programs, _executor_fp32):
    free = _executor_fp32.num_free_pages
    gone = PieClient(server.target)
    events = iter(gone.launch(programs["echo"], ["8"]))
    next(events)
    assert next_message(events) == "ready, holding 8 pages"
    assert _executor_fp32.num_free_pages == free - 8
    gone.close()  # the whole connection goes: the server sees the call cancelled
    wait_until(lambda: _executor_fp32.num_free_pages == free, 30, "the echo's 8 pages coming back")
    assert server.service.List(None, None).inferlets == []


def test_an_attach_takes_the_stream_over_and_the_first_streams_end_does_not_stop_the_inferlet(client, programs):
    """One process (no detach grace): a second client attaches with the owner token from where the first
    left off; the first stream ends ABORTED, and its ending stops nothing: the inferlet runs to its end
    on the new stream."""
    stream = client.launch(programs["text_completion"], ["--prompt", STORY, "--max-tokens", "24", "--ignore-eos"])
    events = stream.events_pb()
    assert [next(events).seq for _ in range(3)] == [0, 1, 2]
    with PieClient(client.address) as other:
        rest = list(other.resume(stream).events_pb())
    assert [e.seq for e in rest] == list(range(3, 3 + len(rest))) and rest[-1].seq == 24 + 1
    assert rest[-1].WhichOneof("kind") == "finished", rest[-1]
    with pytest.raises(RequestFailed) as ended:
        list(events)
    assert ended.value.code == grpc.StatusCode.ABORTED and "another client attached" in ended.value.details
    attached = client.attach(stream.instance_id, stream.owner_token, 25)  # ended: its end is still there
    assert [(e.seq, e.WhichOneof("kind")) for e in attached.events_pb()] == [(25, "finished")]
    with pytest.raises(RequestFailed) as denied:
        list(client.attach(stream.instance_id, "", 3))
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED and "owner token" in denied.value.details


def test_a_flood_of_messages_arrives_whole_and_in_order(client, programs):
    t0 = time.perf_counter()
    messages, end = collect(client.launch(programs["probe"], ["flood", "1", "5000"]))
    elapsed = time.perf_counter() - t0
    assert isinstance(end, Finished), end
    assert messages == ["x"] + [str(i) for i in range(5000)]
    print(f"\n5001 messages streamed in {elapsed:.2f} s: {5001 / elapsed:.0f} messages/s (launch included)")


def test_an_inferlets_own_error_ends_its_stream(client, programs):
    messages, end = collect(client.launch(programs["probe"], ["raise"]))
    assert isinstance(end, Failed)
    assert "ValueError: the inferlet's own failure" in end.error and "api_probe.py" in end.error


def test_bad_uploads_are_refused_with_their_cause(client, wasm):
    cases = [
        (b"hello, not wasm", "not WebAssembly"),
        (b"", "empty"),
        (wasmtime.wat2wasm("(module)"), "core WebAssembly module"),
        (wasmtime.wat2wasm("(component)"), "exports no `run`"),
        (b"\0asm\x0d\x00\x01\x00garbage", "not a valid WebAssembly component"),
    ]
    for data, cause in cases:
        with pytest.raises(RequestFailed) as e:
            client.upload(data)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and cause in str(e.value), (data[:16], e.value)
    with pytest.raises(RequestFailed) as e:
        client.upload(wasm["echo"], sha256="ab" * 32)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not the declared" in str(e.value)


def test_an_upload_over_the_limit_is_refused(host, wasm):
    small = serve(host, port=0, max_component_bytes=100_000)
    try:
        with PieClient(small.target) as client:
            with pytest.raises(RequestFailed) as declared:
                client.upload(wasm["echo"])  # refused on the first chunk, which declares the size
            with pytest.raises(RequestFailed) as counted:
                client.upload(wasm["echo"], sha256="", chunk_bytes=40_000)  # refused once the bytes pass it
        for e in (declared, counted):
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 100000" in str(e.value)
    finally:
        small.stop()


def test_too_many_running_inferlets(host, wasm):
    one = serve(host, port=0, max_running=1)
    try:
        with PieClient(one.target) as client:
            echo = client.upload(wasm["echo"])
            events = iter(client.launch(echo))
            instance = next(events).instance_id
            with pytest.raises(RequestFailed) as busy:
                list(client.launch(echo))
            assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "its limit" in str(busy.value)
            client.terminate(instance)
            assert isinstance(list(events)[-1], Failed)
            wait_until(lambda: client.health().running == 0, 10, "the echo ending")
    finally:
        one.stop()


def test_a_server_with_a_token_wants_it_on_every_call(host, wasm):
    guarded = serve(host, port=0, token="s3cret")
    try:
        for token in (None, "wrong"):
            with PieClient(guarded.target, token=token) as client:
                for call in (client.health, client.list, lambda: client.upload(wasm["echo"]),
                             lambda: list(client.launch("0" * 64)), lambda: client.send("inferlet-1", "hi")):
                    with pytest.raises(RequestFailed) as e:
                        call()
                    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
                    assert ("needs a token" if token is None else "token is wrong") in str(e.value)
        with PieClient(guarded.target, token="s3cret") as client:
            assert client.health().status == "serving"
            echo = client.upload(wasm["echo"])
            events = iter(client.launch(echo))
            instance = next(events).instance_id
            next_message(events)
            client.send(instance, "quit")
            assert isinstance(next(events), Finished)
    finally:
        guarded.stop()


def test_health_and_list(client, server, _executor_fp32):
    health = client.health()
    info = _executor_fp32.info
    assert (health.status, health.model, health.total_pages) == ("serving", info.name, info.num_pages)
    assert health.free_pages == _executor_fp32.num_free_pages and health.running == 0
    assert client.list() == []
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        client.health()
    print(f"\nunary round trip (Health): {(time.perf_counter() - t0) / n * 1e3:.2f} ms")


def test_health_counts_pages_the_prefix_cache_holds_apart_from_free_ones(client, host):
    """Free pages alone are not what an idle server can allocate: the prefix cache keeps pages after
    their inferlets end (the soak test checks free + cached == total once its load is over)."""
    pages = host.worker.pages
    before = client.health()
    held = pages.allocate("health-test", 3, 3)
    assert pages.cache_store("health-test", [bytes([i]) * 32 for i in range(3)], held) == 3
    pages.drop_holder("health-test")
    try:
        health = client.health()
        assert health.cached_pages == before.cached_pages + 3, health
        assert health.free_pages == before.free_pages - 3, health
        assert health.free_pages + health.cached_pages == health.total_pages, health  # nothing runs
    finally:
        pages.drop_cache()
    assert client.health().cached_pages == 0


def test_generated_code_is_current(tmp_path):
    """cluster/proto/*_pb2*.py are what `make proto` makes from the .proto files now."""
    protos = ["pie", "worker"]
    generated = [f"{p}{suffix}" for p in protos for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    *[f"cluster/proto/{p}.proto" for p in protos]], cwd=ROOT, check=True)
    for name in generated:
        fresh = (tmp_path / "cluster" / "proto" / name).read_bytes()
        assert fresh == (ROOT / "cluster" / "proto" / name).read_bytes(), f"{name} is stale: run `make proto`"


# -- the command line: pie serve and pie submit, as processes ----------------------------------------

class _SearchTool(BaseHTTPRequestHandler):
    """A tool for the ReAct example: answers every POST with one fixed observation."""

    def do_POST(self):
        self.server.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        http_reply(self, 200, b"Paris is the capital of France.")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def search_tool():
    with http_server(_SearchTool, calls=[]) as server:
        yield server


@pytest.fixture(scope="module")
def pie_server(session_cache_dir, tmp_path_factory, search_tool):
    """`pie serve --port 0 --http-port 0` in its own process; yields (gRPC address, OpenAI base URL)."""
    env = {**os.environ, "PIE_CACHE_DIR": session_cache_dir, "PIE_TOKEN": ""}
    log = tmp_path_factory.mktemp("pie-serve") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--port", "0", "--dtype", "fp32",
                                 "--http-port", "0", "--allow-http", f"127.0.0.1:{search_tool.server_address[1]}"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: list[str] = []
    both = threading.Event()
    reader = threading.Thread(target=lambda: [lines.append(ln) or len(lines) < 2 or both.set() for ln in proc.stdout],
                              daemon=True)
    reader.start()
    if not both.wait(240):
        proc.kill()
        pytest.fail(f"pie serve printed no addresses; its stderr:\n{log.read_text()[-3000:]}")
    served = re.match(r"pie: serving .* on (127\.0\.0\.1:\d+) ", lines[0])
    http = re.match(r"pie: serving the OpenAI API on (http://127\.0\.0\.1:\d+/v1) ", lines[1])
    assert served and http, (lines, log.read_text()[-3000:])
    yield served.group(1), http.group(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    reader.join(5)
    assert lines[-1].strip() == "pie: stopping"


def _submit(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--addr", address, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PIE_TOKEN": ""})


def test_pie_serve_and_pie_submit(pie_server):
    done = _submit(pie_server[0], str(EXAMPLE), "--", "--prompt", QUESTION, "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    failed = _submit(pie_server[0], str(EXAMPLE), "--", "--nope")
    assert failed.returncode == 1
    assert "unrecognized arguments: --nope" in failed.stderr
    unreachable = _submit("127.0.0.1:1", str(EXAMPLE))
    assert unreachable.returncode == 2 and "UNAVAILABLE" in unreachable.stderr


def test_pie_serve_http_port_serves_the_openai_api(pie_server):
    import openai

    client = openai.OpenAI(base_url=pie_server[1], api_key="any", max_retries=0, timeout=180)
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.choices[0].message.content


def test_pie_serve_allow_http_lets_the_react_agent_call_its_tool(pie_server, search_tool):
    url = f"http://127.0.0.1:{search_tool.server_address[1]}/search"
    done = _submit(pie_server[0], str(REACT), "--", "--tool", url, "--rounds", "2", "--max-tokens", "12")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    rounds = [e for e in events if "round" in e]
    # one answer per action of the thought (usually one), all at once
    assert rounds and all(e["observation"].split("\n") == ["Paris is the capital of France."] * len(e["actions"])
                          for e in rounds)
    assert len(search_tool.calls) >= sum(len(e["actions"]) for e in rounds)
    refused = _submit(pie_server[0], str(REACT), "--", "--tool", "http://127.0.0.1:1/search", "--rounds", "1")
    assert refused.returncode == 1 and "is not allowed" in refused.stderr


def test_a_client_that_reads_nothing_holds_its_inferlet_not_the_servers_memory(client, programs):
    """Issue 18: events once waited in an unbounded queue (and a copy in the outcome), so an inferlet
    sending 64 MB to a client that reads nothing grew the server by as much. Now its outbox fills,
    its send waits, and it resumes as the client reads: nothing lost, nothing piled up."""
    import tracemalloc

    count, size = 1000, 64000
    tracemalloc.start()
    try:
        events = iter(client.launch(programs["probe"], ["flood_big", str(count), str(size)]))
        instance = next(events).instance_id
        time.sleep(5)  # unread, the whole flood would be sent within this (about 2 s here)
        waiting = instance in {i.instance_id for i in client.list()}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert waiting, "the inferlet sent everything to a client that read nothing"
    assert peak < 48 << 20, f"the server buffered {peak >> 20} MiB for one client that reads nothing"
    rest = list(events)
    assert isinstance(rest[-1], Finished), rest[-1]
    assert [m.text.partition(":")[0] for m in rest[:-1]] == [str(i) for i in range(count)]
