"""A small client of the pie client API, for `pie submit`, the tests and load tests.

    with PieClient("127.0.0.1:50051", token=None) as client:
        program = client.upload("app.wasm")
        stream = client.launch(program, ["--prompt", "Hi"])
        for event in stream:
            ...  # Started, then Message..., then Finished or Failed

A stream that breaks without the client asking (RequestFailed: a cluster gateway died) can be
picked up where it broke: `client.resume(stream)` attaches to the inferlet through any gateway
and yields the events the client has not had yet.

Every call that the server refuses, or that cannot reach it, raises RequestFailed with the status
code and the server's explanation. The client is thread-safe (one channel, many calls).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from cluster.rpc.grpc_auth import bearer_metadata
from cluster.proto import pie_pb2, pie_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit
UNARY_TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 600.0  # the server compiles a new component before it answers

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is `pie serve` running there, and is the address right?",
    grpc.StatusCode.UNAUTHENTICATED: "pass the server's token (--token or PIE_TOKEN)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time; it may be overloaded",
}


class RequestFailed(Exception):
    """A call the server refused or could not be made: `code` is the gRPC status code."""

    def __init__(self, call: str, address: str, code: grpc.StatusCode, details: str):
        self.call, self.address, self.code, self.details = call, address, code, details
        hint = _HINTS.get(code)
        super().__init__(f"{call} to {address} failed ({code.name}): {details}" + (f"; {hint}" if hint else ""))

    @classmethod
    def of(cls, call: str, address: str, error: grpc.RpcError) -> "RequestFailed":
        return cls(call, address, error.code(), error.details() or "")


# -- what a Launch stream yields --------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    instance_id: str
    owner_token: str = ""  # what an Attach to it must give


@dataclass(frozen=True)
class Message:
    text: str  # one send() of the inferlet


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Failed:
    error: str  # the inferlet's own exception and traceback, a trap, a limit, or who stopped it


Event = Started | Message | Finished | Failed


@dataclass(frozen=True)
class Uploaded:
    program_id: str  # the component's sha256 hex digest
    size: int  # bytes
    already_present: bool  # the server held these bytes before this upload


def _uploaded(ref: pie_pb2.ProgramRef) -> Uploaded:
    return Uploaded(ref.program_id, ref.size, ref.already_present)


@dataclass(frozen=True)
class InferletInfo:
    instance_id: str
    program_id: str
    seconds_running: float


@dataclass(frozen=True)
class Health:
    status: str
    model: str
    free_pages: int  # KV pages free now
    total_pages: int
    running: int  # inferlets launched through the server and not yet ended
    cached_pages: int = 0  # KV pages held only by the prefix cache (free_pages + cached_pages: what can be allocated)


def _event(pb: pie_pb2.Event) -> Event:
    kind = pb.WhichOneof("kind")
    if kind == "started":
        return Started(pb.started.instance_id, pb.started.owner_token)
    if kind == "message":
        return Message(pb.message.text)
    if kind == "finished":
        return Finished()
    if kind == "failed":
        return Failed(pb.failed.error)
    raise ValueError(f"an event of unknown kind {kind!r}: is the server newer than this client?")


class LaunchStream:
    """The events of one launched (or attached) inferlet. Iterate it; `cancel()` ends the call, which
    stops a launched inferlet (an attached one waits for the next Attach: Terminate stops it)."""

    def __init__(self, call, address: str, terminate=None, name: str = "Launch", instance_id: str | None = None,
                 owner_token: str = "", last_seq: int = -1):
        self._call = call
        self._address = address
        self._terminate = terminate  # PieClient.terminate
        self._name = name
        self._cancelled = False
        self.instance_id = instance_id  # known once Started has been seen
        self.owner_token = owner_token  # likewise
        self.last_seq = last_seq  # of the last event yielded: resume from last_seq + 1

    def __iter__(self) -> Iterator[Event]:
        for pb in self.events_pb():
            yield _event(pb)

    def events_pb(self) -> Iterator[pie_pb2.Event]:
        """The events as the server sent them (with their seq)."""
        try:
            for pb in self._call:
                if pb.WhichOneof("kind") == "started":
                    self.instance_id, self.owner_token = pb.started.instance_id, pb.started.owner_token
                self.last_seq = pb.seq
                yield pb
        except grpc.RpcError as e:
            if not (self._cancelled and e.code() == grpc.StatusCode.CANCELLED):
                raise RequestFailed.of(self._name, self._address, e) from None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, terminate: bool = False) -> None:
        """End the call, which stops the inferlet. `terminate=True` first asks the server to Terminate it
        (once its instance id is known): Ray Serve's gRPC proxy does not always pass a cancelled stream
        on to the deployment (deploy/app.py), so a client of a Serve deployment should stop it this way."""
        if terminate and self.instance_id is not None and self._terminate is not None:
            try:
                self._terminate(self.instance_id)
            except RequestFailed:
                pass  # it has ended already, or the server is gone: cancelling is all that is left
        self._cancelled = True
        self._call.cancel()


class PieClient:
    def __init__(self, address: str, token: str | None = None, timeout_s: float = UNARY_TIMEOUT_S,
                 metadata: tuple[tuple[str, str], ...] = ()):
        """`metadata`: sent with every call besides the token, e.g. (("application", "pie"),) to reach the
        application of that name behind Ray Serve's gRPC proxy (deploy/app.py)."""
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = tuple(metadata) + (bearer_metadata(token) if token else ())
        self._channel = grpc.insecure_channel(address)
        self._stub = pie_pb2_grpc.InferletsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PieClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, name: str, request, timeout_s: float | None = None):
        try:
            return getattr(self._stub, name)(request, metadata=self._metadata, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise RequestFailed.of(name, self.address, e) from None

    def upload(self, program: bytes | bytearray | str | os.PathLike, sha256: str | None = None,
               chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> str:
        """Upload a component (its bytes, or a .wasm path); return its program id (upload_program
        also says whether the server held it already)."""
        return self.upload_program(program, sha256, chunk_bytes).program_id

    def upload_program(self, program: bytes | bytearray | str | os.PathLike, sha256: str | None = None,
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> Uploaded:
        """Upload a component (its bytes, or a .wasm path). With a digest (its sha256, computed unless
        `sha256` is ""), a first call sends the digest and size alone: a server that holds those bytes
        answers already_present and nothing more is sent; one that does not (NOT_FOUND) gets the
        bytes in a second call. Without a digest the bytes go at once."""
        data = bytes(program) if isinstance(program, (bytes, bytearray)) else Path(program).read_bytes()
        digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
        if digest and data:
            try:
                return _uploaded(self._unary("Upload", iter([pie_pb2.UploadChunk(sha256=digest, total_size=len(data))]),
                                             UPLOAD_TIMEOUT_S))
            except RequestFailed as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise

        def chunks() -> Iterator[pie_pb2.UploadChunk]:
            view = memoryview(data)
            yield pie_pb2.UploadChunk(data=bytes(view[:chunk_bytes]), sha256=digest, total_size=len(data))
            for start in range(chunk_bytes, len(data), chunk_bytes):
                yield pie_pb2.UploadChunk(data=bytes(view[start:start + chunk_bytes]))

        return _uploaded(self._unary("Upload", chunks(), UPLOAD_TIMEOUT_S))

    def launch(self, program_id: str, arguments: list[str] | tuple[str, ...] = (), prompt_hint: str = "",
               tenant: str = "") -> LaunchStream:
        """Start a program; `prompt_hint` (optional) is text its context will start with, which a
        cluster uses to place it beside a cached prefix; `tenant` (optional) names whose prefix
        cache it shares."""
        request = pie_pb2.LaunchRequest(program_id=program_id, arguments=list(arguments), prompt_hint=prompt_hint,
                                        tenant=tenant)
        call = self._stub.Launch(request, metadata=self._metadata)
        return LaunchStream(call, self.address, self.terminate)

    def attach(self, instance_id: str, owner_token: str, from_seq: int = 0) -> LaunchStream:
        """The events of a running (or recently ended) inferlet from `from_seq` on (see `resume`)."""
        request = pie_pb2.AttachRequest(instance_id=instance_id, owner_token=owner_token, from_seq=from_seq)
        call = self._stub.Attach(request, metadata=self._metadata)
        return LaunchStream(call, self.address, self.terminate, "Attach", instance_id, owner_token, from_seq - 1)

    def resume(self, stream: LaunchStream) -> LaunchStream:
        """Attach to the inferlet of a stream that broke, for the events after the last it yielded."""
        if stream.instance_id is None or not stream.owner_token:
            raise ValueError("the stream broke before its `started` event: there is no inferlet to attach to")
        return self.attach(stream.instance_id, stream.owner_token, stream.last_seq + 1)

    def send(self, instance_id: str, text: str) -> None:
        self._unary("Send", pie_pb2.SendRequest(instance_id=instance_id, text=text))

    def terminate(self, instance_id: str) -> None:
        self._unary("Terminate", pie_pb2.TerminateRequest(instance_id=instance_id))

    def list(self, timeout_s: float | None = None) -> list[InferletInfo]:
        reply = self._unary("List", pie_pb2.Empty(), timeout_s)
        return [InferletInfo(i.instance_id, i.program_id, i.seconds_running) for i in reply.inferlets]

    def health(self) -> Health:
        r = self._unary("Health", pie_pb2.Empty())
        return Health(r.status, r.model, r.free_pages, r.total_pages, r.running, r.cached_pages)
