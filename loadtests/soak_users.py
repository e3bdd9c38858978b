"""The soak test's locust users (`make soak` runs them through loadtests/soak.py): the load test's two
normal users (locustfile.py) beside clients and programs that misbehave the way real ones do.

    DisconnectingUser  starts a launch over gRPC, reads three messages and goes away: the server
                       must stop what it started
    OpenAIDropUser     the same with a streaming chat completion over the OpenAI API
    SlowReaderUser     launches a program that sends more than the server's outbox holds (api_probe's
                       flood_big: 600 x 16 KB) and reads it slowly: `send` must wait, and every
                       message must arrive, in order, and the launch finish
    HostileUser        every --hostile-every seconds launches a hostile program (api_probe in one of
                       HOSTILE's modes, in turn): it must end cleanly (its error, or the refusals it
                       reports) within --hostile-timeout, having read no file and opened no socket

Request names (locust's "type name"): grpc/http ttft, itl, e2e as in locustfile.py; grpc/http
disconnect; grpc slow_reader; hostile <mode>. A request fails when the behaviour named above breaks.
How many users of each class: PIE_SOAK_MIX="TextCompletionUser=2,HostileUser=1,..." (soak.py sets it)
gives each class its fixed_count. Like locustfile.py, this must not import torch, transformers or ray.
"""
from __future__ import annotations

import itertools
import json
import os
import time

import gevent
import grpc
from locust import User, between, constant, events, task
from locust.exception import StopUser

from locustfile import (PROMPTS, OpenAIChatUser, Program, TextCompletionUser, describe, grpc_address, options,
                        record, text_program)
from cluster.proto import pie_pb2, pie_pb2_grpc
from cluster.rpc.grpc_auth import bearer_metadata

__all__ = ["TextCompletionUser", "OpenAIChatUser", "DisconnectingUser", "OpenAIDropUser", "SlowReaderUser",
           "HostileUser"]

READ_BEFORE_LEAVING = 3  # messages a disconnecting client reads first
FLOOD = (600, 16_000)  # the slow reader's messages and their bytes: 9.6 MB, past the 4 MiB outbox
HOSTILE = (  # api_probe's arguments, and how a clean end looks
    (("spin",), "failed"),  # runs out of fuel
    (("memory_bomb",), "failed"),  # past its memory limit
    (("hog_pages", "keep"), "failed"),  # takes pages to its limit and raises holding them
    (("oversized",), "refused"),  # every host call given sizes past its cap: each one refused
    (("huge_list",), "failed"),  # a list past what the host lifts
    (("wrong_type",), "failed"),  # a trap while lowering a WIT value
    (("read_file", "/etc/passwd"), "no access"),
    (("socket", "22"), "no access"),
    (("flood_big", "2000", "60000"), "abandoned"),  # its client reads nothing and leaves after 5 s
    (("raise",), "failed"),
)
probe_program = Program()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--probe-wasm", default="", help="tests/inferlets/api_probe.py, built")
    parser.add_argument("--hostile-every", type=float, default=15.0, help="seconds between hostile launches")
    parser.add_argument("--hostile-timeout", type=float, default=180.0,
                        help="seconds a hostile launch may take to end before it counts as a hang")


def _apply_mix() -> None:
    """fixed_count of each class from PIE_SOAK_MIX (read at import: locust reads it when it starts)."""
    for item in filter(None, os.environ.get("PIE_SOAK_MIX", "").split(",")):
        name, count = item.split("=")
        globals()[name].fixed_count = int(count)


class _GrpcUser(User):
    """A gRPC client of the soak: a channel of its own, the programs uploaded once per process."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self.max_tokens, _, self.timeout, token = options(self.environment)
        self.metadata = bearer_metadata(token) if token else ()
        self.address = grpc_address(self)
        self.token = token
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pie_pb2_grpc.InferletsStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def program(self, which: Program, wasm: str) -> str:
        try:
            return which.get(self.address, self.token, wasm)
        except RuntimeError as e:  # the upload failed: nothing this user does can work
            record(self.environment, "grpc", "upload", 0, exception=RuntimeError(f"upload failed: {e}"))
            raise StopUser() from None

    def launch(self, program_id: str, args) -> grpc.Call:
        request = pie_pb2.LaunchRequest(program_id=program_id, arguments=list(args))
        return self.stub.Launch(request, metadata=self.metadata, timeout=self.timeout)


def _outcome(environment, kind: str, name: str, start: float, length: int, error: str | None) -> None:
    """Record a request begun at perf_counter() `start`: a failure carrying `error`, or a success."""
    record(environment, kind, name, (time.perf_counter() - start) * 1e3, length,
           RuntimeError(error) if error else None)


def _end(event) -> tuple[str, str]:
    """("finished", "") or ("failed", its error) for a final event; ("", "") for any other."""
    kind = event.WhichOneof("kind")
    if kind == "finished":
        return "finished", ""
    if kind == "failed":
        return "failed", event.failed.error.strip()
    return "", ""


class DisconnectingUser(_GrpcUser):
    """Reads READ_BEFORE_LEAVING messages of a launch and cancels it."""

    @task
    def leave_mid_stream(self) -> None:
        args = ["--prompt", PROMPTS[0], "--max-tokens", "64", "--ignore-eos"]
        program_id = self.program(text_program, self.environment.parsed_options.wasm)
        start, messages, error = time.perf_counter(), 0, None
        call = self.launch(program_id, args)
        try:
            for event in call:
                if event.WhichOneof("kind") == "message":
                    messages += 1
                    if messages == READ_BEFORE_LEAVING:
                        break
                elif _end(event)[0]:
                    error = f"it ended before the client left: {_end(event)}"
                    break
            else:
                error = "the stream ended without Finished or Failed"
        except grpc.RpcError as e:
            error = f"Launch: {describe(e)}"
        finally:
            call.cancel()
        _outcome(self.environment, "grpc", "disconnect", start, messages, error)


class OpenAIDropUser(OpenAIChatUser):
    """A streaming chat completion read for READ_BEFORE_LEAVING chunks, then the connection closed."""

    @task
    def chat(self) -> None:
        if self.model is None:
            raise StopUser()
        body = {"model": self.model, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 64,
                "stream": True, "ignore_eos": True}
        start, chunks, error = time.perf_counter(), 0, None
        try:
            with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                                  timeout=self.timeout, name="drop", catch_response=True) as response:
                response.success()  # the row below is what counts
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    for line in response.iter_lines():
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            chunks += 1
                            if chunks == READ_BEFORE_LEAVING:
                                break
                    else:
                        error = "the stream ended before the client left"
                response.raw.close()  # leave: close the connection with the stream unread
        except Exception as e:  # noqa: BLE001  a connection error or a timeout
            error = f"{type(e).__name__}: {e}"
        _outcome(self.environment, "http", "disconnect", start, chunks, error)


class SlowReaderUser(_GrpcUser):
    """FLOOD's messages, read one every 10 ms: all of them, in order, then Finished."""

    wait_time = between(0.5, 1.5)

    @task
    def read_slowly(self) -> None:
        count, size = FLOOD
        program_id = self.program(probe_program, self.environment.parsed_options.probe_wasm)
        start, got, error = time.perf_counter(), 0, "the stream ended without Finished or Failed"
        call = self.launch(program_id, ["flood_big", str(count), str(size)])
        try:
            for event in call:
                kind = event.WhichOneof("kind")
                if kind == "message":
                    if not event.message.text.startswith(f"{got}:"):
                        error = f"message {got} is {event.message.text[:20]!r}...: lost or out of order"
                        break
                    got += 1
                    gevent.sleep(0.01)
                elif kind in ("finished", "failed"):
                    end, why = _end(event)
                    error = None if end == "finished" and got == count else f"{end} after {got}/{count}: {why}"
                    break
        except grpc.RpcError as e:
            error = f"Launch: {describe(e)} after {got}/{count} messages"
        finally:
            call.cancel()
        _outcome(self.environment, "grpc", "slow_reader", start, got, error)


class HostileUser(_GrpcUser):
    """HOSTILE's programs in turn, one every --hostile-every seconds."""

    _modes = itertools.cycle(HOSTILE)

    def wait_time(self) -> float:
        return self.environment.parsed_options.hostile_every

    @task
    def misbehave(self) -> None:
        args, expected = next(self._modes)
        opts = self.environment.parsed_options
        program_id = self.program(probe_program, opts.probe_wasm)
        start = time.perf_counter()
        error = f"it did not end within {opts.hostile_timeout:.0f} s"
        with gevent.Timeout(opts.hostile_timeout, False):
            error = self._run(program_id, args, expected)
        _outcome(self.environment, "hostile", args[0], start, 0, error)

    def _run(self, program_id: str, args, expected: str) -> str | None:
        """None when the program ended as `expected`; else what went wrong."""
        call = self.launch(program_id, args)
        messages = []
        try:
            for event in call:
                kind = event.WhichOneof("kind")
                if kind == "started" and expected == "abandoned":
                    gevent.sleep(5.0)  # reads nothing while it floods, then leaves
                    return None
                if kind == "message":
                    messages.append(event.message.text)
                end, why = _end(event)
                if end:
                    return self._judge(expected, end, why, messages)
            return "the stream ended without Finished or Failed"
        except grpc.RpcError as e:
            return f"Launch: {describe(e)}"
        finally:
            call.cancel()

    @staticmethod
    def _judge(expected: str, end: str, why: str, messages: list[str]) -> str | None:
        if expected == "failed":
            return None if end == "failed" and why else f"expected a failure with its cause, got {end} {why!r}"
        if end != "finished" or len(messages) != 1:
            return f"expected it to finish with one report, got {end} {why!r} after {len(messages)} messages"
        report = json.loads(messages[0])
        if expected == "refused":
            passed = [cap for cap, refusal in report.items() if not refusal]
            return f"calls past their caps were not refused: {passed}" if passed else None
        return None if "error" in report else f"it reached what it must not: {report}"


_apply_mix()
