"""A locust load test of a pie server. Two users, one per API (name the one to run):
TextCompletionUser launches the text_completion inferlet over gRPC, again and again, and reads its
event stream; OpenAIChatUser sends streaming chat completions to the OpenAI API (`pie serve
--http-port`) with locust's own HTTP client.

    locust -f loadtests/locustfile.py TextCompletionUser --headless -u 4 -r 4 -t 60s --host 127.0.0.1:50051 \
        --wasm text_completion.wasm [--max-tokens 32] [--no-ignore-eos] [--launch-timeout 300] \
        [--samples-json samples.json] [--pie-token T]
    locust -f loadtests/locustfile.py OpenAIChatUser --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 ...

`loadtests/run.py` (`make loadtest`) builds the component, starts `pie serve` and runs this. Metrics,
as locust requests of type "grpc" or "http" (milliseconds):
    ttft  from the Launch call (the POST) to the first Message event (the first chunk with text)
    itl   each gap between consecutive messages (chunks with text) of one request
    e2e   from the request to Finished (`data: [DONE]`); its "size" is the number of messages
Each user runs a closed loop with no think time, cycling through a few prompts, with --ignore-eos
(every launch generates --max-tokens). A Failed event or a gRPC error (a launch past --launch-timeout
included) is a failure of "e2e" carrying the error text; a failed upload is a failure of "upload" and
stops the test (exit status 2). --samples-json writes every successful sample on quitting: exact
percentiles for loadtests/run.py (locust's tables round times above 100 ms), per process. The
component is uploaded once per process, on the first user's start (content-addressed: a server that
already holds it answers at once).

Run by locust in its own process: this file must not import torch, transformers or ray (locust's
gevent monkey-patching breaks ssl beside them); it imports only the generated gRPC stubs and
cluster.api.grpc_client / grpc_auth, which import nothing else (tests/test_loadtest.py checks).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time

import gevent
import gevent.lock
import grpc
import grpc.experimental.gevent
from locust import HttpUser, User, constant, events, task
from locust.exception import StopUser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from cluster.rpc.grpc_auth import bearer_metadata  # noqa: E402
from cluster.api.grpc_client import PieClient, RequestFailed  # noqa: E402  (grpc and the stubs only)
from cluster.proto import pie_pb2, pie_pb2_grpc  # noqa: E402

grpc.experimental.gevent.init_gevent()  # before any channel: gRPC's waits yield to other greenlets

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU cache is.",
    "Give me three names for a grey cat.",
)
log = logging.getLogger("pie-loadtest")


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--wasm", env_var="PIE_LOADTEST_WASM", default="",
                        help="the text_completion component (`pie build inferlets/examples/text_completion.py -o X.wasm`)")
    parser.add_argument("--max-tokens", type=int, env_var="PIE_LOADTEST_MAX_TOKENS", default=32,
                        help="tokens each launch generates (default 32)")
    parser.add_argument("--no-ignore-eos", action="store_true", default=False,
                        help="stop at the model's end of turn (default: always generate --max-tokens)")
    parser.add_argument("--launch-timeout", type=float, default=300.0,
                        help="seconds one launch may take to finish before it counts as failed (default 300)")
    parser.add_argument("--samples-json", default="", include_in_web_ui=False,
                        help="on quitting, write every successful sample (ms) of ttft / itl / e2e and the "
                             "request and failure counts to this JSON file (exact percentiles; locust rounds)")
    parser.add_argument("--pie-token", env_var="PIE_TOKEN", default="", is_secret=True,
                        help="the server's bearer token (default: $PIE_TOKEN)")
    parser.add_argument("--grpc-host", default="",
                        help="HOST:PORT of the gRPC API when --host is the HTTP one (users of both APIs in one run)")


class Program:
    """The component's program id on the server, uploaded once per process (a failure is kept too:
    the users after the first one report it without trying again)."""

    def __init__(self):
        self.lock = gevent.lock.Semaphore()
        self.program_id: str | None = None
        self.error: str | None = None

    def get(self, address: str, token: str, wasm_path: str) -> str:
        with self.lock:
            if self.program_id is None and self.error is None:
                try:
                    self.program_id = self._upload(address, token, wasm_path)
                except (RequestFailed, OSError, ValueError) as e:
                    self.error = str(e)
            if self.error is not None:
                raise RuntimeError(self.error)
            return self.program_id

    @staticmethod
    def _upload(address: str, token: str, wasm_path: str) -> str:
        if not address:
            raise ValueError("no server given: pass --host HOST:PORT")
        if not wasm_path:
            raise ValueError("no component given: pass --wasm PATH (or PIE_LOADTEST_WASM); build it with "
                             "`.venv/bin/pie build inferlets/examples/text_completion.py -o PATH`")
        with PieClient(address, token=token or None) as client:
            return client.upload(wasm_path)


text_program = Program()
SAMPLES_MS: dict[str, list[float]] = {"ttft": [], "itl": [], "e2e": []}  # successes of this process


@events.quitting.add_listener
def _write_samples(environment, **_) -> None:
    """The final figures (locust's CSV is rewritten once a second, so it can miss the last second)."""
    path = environment.parsed_options.samples_json if environment.parsed_options else ""
    if not path or environment.runner is None:
        return
    stats = environment.runner.stats
    report = {
        "samples_ms": SAMPLES_MS,
        "requests": {f"{method} {name}": {"count": e.num_requests, "failures": e.num_failures}
                     for (name, method), e in stats.entries.items()},  # method: grpc / http / ...
        "failures": stats.total.num_failures,
        "errors": [{"name": e.name, "method": e.method, "error": str(e.error), "occurrences": e.occurrences}
                   for e in stats.errors.values()],
        "run_s": time.time() - stats.total.start_time,
    }
    with open(path, "w") as f:
        json.dump(report, f)


def record(environment, request_type: str, name: str, ms: float, length: int = 0,
            exception: BaseException | None = None) -> None:
    if exception is None and name in SAMPLES_MS:
        SAMPLES_MS[name].append(ms)
    environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                    response_length=length, exception=exception, context={})


def options(environment) -> tuple[int, bool, float, str]:
    """(max tokens, ignore eos, timeout s, token) from locust's command line (defaults without one)."""
    opts = environment.parsed_options
    if opts is None:
        return 32, True, 300.0, ""
    return opts.max_tokens, not opts.no_ignore_eos, opts.launch_timeout, opts.pie_token


def grpc_address(user: User) -> str:
    """The gRPC API's HOST:PORT: --grpc-host when given (--host is then the HTTP API's), else --host."""
    opts = user.environment.parsed_options
    return (opts.grpc_host if opts is not None and opts.grpc_host else user.host or "").removeprefix("grpc://")


def describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class TextCompletionUser(User):
    """One client at a time: launch text_completion, read its stream to the end, launch again."""

    wait_time = constant(0)
    _prompts = itertools.cycle(PROMPTS)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.max_tokens, self.ignore_eos, self.launch_timeout, token = options(self.environment)
        self.metadata = bearer_metadata(token) if token else ()
        address = grpc_address(self)
        t0 = time.perf_counter()
        try:
            self.program_id = text_program.get(address, token, opts.wasm if opts else "")
        except RuntimeError as e:
            log.error("upload of the component to %s failed: %s; stopping the test", address or "?", e)
            self._fire("upload", (time.perf_counter() - t0) * 1e3, exception=RuntimeError(f"upload failed: {e}"))
            self.environment.process_exit_code = 2
            gevent.spawn(self.environment.runner.quit)
            self.program_id = None  # the task stops this user (StopUser here would log a traceback)
            return
        self.channel = grpc.insecure_channel(address)
        self.stub = pie_pb2_grpc.InferletsStub(self.channel)

    def on_stop(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    def _fire(self, name: str, ms: float, length: int = 0, exception: BaseException | None = None) -> None:
        record(self.environment, "grpc", name, ms, length, exception)

    @task
    def text_completion(self) -> None:
        if self.program_id is None:
            raise StopUser()
        args = ["--prompt", next(self._prompts), "--max-tokens", str(self.max_tokens)]
        if self.ignore_eos:
            args.append("--ignore-eos")
        request = pie_pb2.LaunchRequest(program_id=self.program_id, arguments=args)
        start = time.perf_counter()
        call = self.stub.Launch(request, metadata=self.metadata, timeout=self.launch_timeout)
        messages, last = 0, None

        def end(error: str | None = None) -> None:
            self._fire("e2e", (time.perf_counter() - start) * 1e3, length=messages,
                       exception=RuntimeError(error) if error else None)

        try:
            for event in call:
                kind = event.WhichOneof("kind")
                if kind == "message":
                    now = time.perf_counter()
                    if last is None:
                        self._fire("ttft", (now - start) * 1e3)
                    else:
                        self._fire("itl", (now - last) * 1e3)
                    messages, last = messages + 1, now
                elif kind == "finished":
                    return end()
                elif kind == "failed":
                    return end(f"the inferlet failed: {event.failed.error.strip()}")
            end("the stream ended without Finished or Failed")
        except grpc.RpcError as e:
            end(f"Launch: {describe(e)}")
        finally:
            call.cancel()  # no-op after the end; stops the inferlet when the test stops this user mid-stream


class OpenAIChatUser(HttpUser):
    """One client at a time: a streaming chat completion over the OpenAI API, read to `[DONE]`."""

    wait_time = constant(0)
    _prompts = itertools.cycle(PROMPTS)

    def on_start(self) -> None:
        self.max_tokens, self.ignore_eos, self.timeout, token = options(self.environment)
        self.headers = {"Authorization": f"Bearer {token or 'none'}"}
        models = self.client.get("/v1/models", headers=self.headers, name="models")
        self.model = models.json()["data"][0]["id"] if models.ok else None
        if self.model is None:
            log.error("GET /v1/models at %s failed (%s); stopping the test", self.host, models.status_code)
            self.environment.process_exit_code = 2
            gevent.spawn(self.environment.runner.quit)

    @task
    def chat(self) -> None:
        if self.model is None:
            raise StopUser()
        body = {"model": self.model, "messages": [{"role": "user", "content": next(self._prompts)}],
                "max_tokens": self.max_tokens, "stream": True, "ignore_eos": self.ignore_eos}
        start = time.perf_counter()
        messages, last, error = 0, None, "the stream ended without data: [DONE]"
        try:
            with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                                  timeout=self.timeout, name="chat", catch_response=True) as response:
                response.success()  # the figures below are what count, not locust's own row
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    for line in response.iter_lines():
                        if not line.startswith(b"data: "):
                            continue
                        data = line[6:]
                        if data == b"[DONE]":
                            error = None
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = f"error in the stream: {chunk['error'].get('message')}"
                            break
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            now = time.perf_counter()
                            if last is None:
                                record(self.environment, "http", "ttft", (now - start) * 1e3)
                            else:
                                record(self.environment, "http", "itl", (now - last) * 1e3)
                            messages, last = messages + 1, now
        except Exception as e:  # a connection error or a timeout: the request failed
            error = f"{type(e).__name__}: {e}"
        record(self.environment, "http", "e2e", (time.perf_counter() - start) * 1e3, messages,
                RuntimeError(error) if error else None)
