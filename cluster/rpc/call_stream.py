"""Handler calls over one bidirectional gRPC stream: both ends, for any service of this shape.

A client sends msgpack `Call`s (cluster/rpc/handler_codec.py) in `Frame`s and the server answers each
with a `Reply` carrying the call's id, in whatever order the calls finish: a handler returning a
Pending answers when it is done. The worker service (hosts calling a worker's handlers) and the
message bus (hosts calling the cluster's one MessageBus) are both this.

- `CallServicer(handlers, release)`: the server side of one service. Each call names the inferlet
  it is made for (its holder); when a client's stream ends (it closed, or died), `release(holder)`
  runs for every inferlet that called through it, so nothing a dead host's inferlets held stays held.
- `CallClient(target, open_stream, unavailable, what)`: the client side of one connection. `call()`
  returns a Pending; if the connection drops, every outstanding and later call fails with
  `unavailable(reason)`, naming `what` was lost.
- `CallServer(add_servicer, servicer)`: a gRPC server for one such service.

These services are the cluster's inside: with a token (the cluster's internal token, see
cluster/actors/cluster.py) the server refuses any stream that does not carry it, UNAUTHENTICATED,
and the client sends it with its stream.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Callable

from concurrent import futures

import grpc

from cluster.rpc.frames import END, MESSAGE_LIMITS, frames
from cluster.rpc.grpc_auth import BearerTokenAuth, bearer_metadata
from cluster.rpc.handler_codec import Call, Reply, decode_call, decode_reply, encode_call, encode_reply
from cluster.pending import Pending
from cluster.proto import worker_pb2

log = logging.getLogger("pie.calls")


class CallServicer:
    def __init__(self, handlers: dict[str, Callable], release: Callable[[str], None], releasing: str = "release",
                 hold: Callable[[], None] | None = None, flush: Callable[[], None] | None = None):
        """`handlers`: method -> fn(holder, *args), returning a value or a Pending. A call of the
        method `releasing` ends its holder's tracking (it released itself). `hold()` / `flush()` run
        around each incoming frame's calls (the worker wakes its executor once per frame)."""
        self._handlers = handlers
        self._release = release
        self._releasing = releasing
        self._hold, self._flush = hold, flush

    def Calls(self, incoming, context):
        replies: queue.SimpleQueue = queue.SimpleQueue()
        holders: set[str] = set()
        threading.Thread(target=self._read, args=(incoming, replies, holders), name="serve-calls",
                         daemon=True).start()
        try:
            for batch in frames(replies):
                yield worker_pb2.Frame(messages=batch)
        finally:
            for holder in list(holders):  # the client is gone: nothing it held may stay held
                try:
                    self._release(holder)
                except Exception:
                    log.exception("releasing %s after its stream ended failed", holder)

    def _read(self, incoming, replies: queue.SimpleQueue, holders: set[str]) -> None:
        try:
            for frame in incoming:
                if self._hold:
                    self._hold()
                try:
                    for message in frame.messages:
                        self._run(decode_call(message), replies, holders)
                finally:
                    if self._flush:
                        self._flush()
        except Exception as e:  # the stream broke or a frame was garbage: end the connection
            if not isinstance(e, grpc.RpcError):
                log.exception("handler-call stream failed")
        finally:
            replies.put(END)

    def _run(self, call: Call, replies: queue.SimpleQueue, holders: set[str]) -> None:
        answer = lambda reply: replies.put(encode_reply(reply))
        fn = self._handlers.get(call.method)
        if fn is None:
            answer(Reply.failure(call.call_id, ValueError(f"no handler {call.method!r} here")))
            return
        if call.holder:
            holders.add(call.holder)
        try:
            value = fn(call.holder, *call.args)
        except Exception as e:
            answer(Reply.failure(call.call_id, e))
            return
        if isinstance(value, Pending):  # answered when it is done
            value.on_done(lambda r: answer(Reply.failure(call.call_id, r.error) if r.error
                                           else Reply(call.call_id, r.value)))
            return
        if call.method == self._releasing:
            holders.discard(call.holder)
        answer(Reply(call.call_id, value))


class CallServer:
    """`servicer` served on address:port (port 0: any free one) by `add_servicer(servicer, server)` (the
    generated add_*Servicer_to_server); `target` is what clients dial."""

    def __init__(self, add_servicer: Callable, servicer, address: str = "127.0.0.1", port: int = 0,
                 max_clients: int = 64, token: str | None = None, name: str = "calls"):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_clients, thread_name_prefix=f"{name}-rpc"),
                                   interceptors=[BearerTokenAuth(token)] if token else [],
                                   options=[("grpc.so_reuseport", 0), *MESSAGE_LIMITS])
        add_servicer(servicer, self._server)
        self.port = self._server.add_insecure_port(f"{address}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {address}:{port} (in use, or not an address of this machine)")
        self.target = f"{address}:{self.port}"
        self._server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()


class CallClient:
    def __init__(self, target: str, open_stream: Callable[[grpc.Channel], Callable], unavailable: type[Exception],
                 what: str, timeout_s: float = 60.0, on_broken: Callable[[str], None] | None = None,
                 token: str | None = None):
        """Dials `target`; `open_stream(channel)` is the stub's stream method (e.g. WorkerStub(channel).Calls).
        `what` names the other side in errors ("the worker at HOST:PORT"). `on_broken(reason)` runs
        once, on the reader thread, when the connection is lost (not when close() ends it). `token`: the
        server's, sent with the stream."""
        self.target, self.what, self.timeout_s = target, what, timeout_s
        self._unavailable = unavailable
        self._on_broken = on_broken
        self._closing = False
        self._channel = grpc.insecure_channel(target, options=MESSAGE_LIMITS)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.broken: str | None = None  # why the connection is lost, or None while it stands
        stream = open_stream(self._channel)(self._frames(), metadata=bearer_metadata(token) if token else None)
        threading.Thread(target=self._read, args=(stream,), name="call-replies", daemon=True).start()

    def register(self, method: str, holder: str, args: tuple) -> tuple[Pending, bytes | None]:
        """A call's Pending and its encoded message, to send() now or later (None: the connection
        is lost, and the Pending has failed)."""
        pending = Pending()
        with self._lock:
            if self.broken:
                pending.fail(self._unavailable(self.broken))
                return pending, None
            call_id = next(self._ids)
            self._calls[call_id] = pending
        return pending, encode_call(Call(call_id, method, holder, args))

    def send(self, message: bytes) -> None:
        self._outbox.put(message)

    def call(self, method: str, holder: str, *args) -> Pending:
        """Send a call; its Pending completes with the value, or fails with the other side's error."""
        pending, message = self.register(method, holder, args)
        if message is not None:
            self.send(message)
        return pending

    def sync(self, method: str, holder: str, *args):
        return self.wait(self.call(method, holder, *args))

    def wait(self, pending: Pending):
        """The value of one of this connection's Pendings; `unavailable` when it does not answer in time."""
        try:
            return pending.wait(self.timeout_s)
        except TimeoutError:
            raise self._unavailable(f"{self.what} did not answer within {self.timeout_s} s") from None

    def close(self) -> None:
        self._closing = True  # a connection this side ends is not one lost
        self._outbox.put(END)
        self._channel.close()

    def _frames(self):
        for batch in frames(self._outbox):
            yield worker_pb2.Frame(messages=batch)

    def _read(self, stream) -> None:
        reason = f"{self.what} closed the connection"
        try:
            for frame in stream:
                for message in frame.messages:
                    reply = decode_reply(message)
                    with self._lock:
                        pending = self._calls.pop(reply.call_id, None)
                    if pending is None:
                        continue
                    try:
                        pending.complete(reply.result())
                    except Exception as e:  # the other side's error, as its own class
                        pending.fail(e)
        except grpc.RpcError as e:
            reason = f"lost {self.what}: {e.code().name} {e.details()}"
        with self._lock:
            self.broken = reason
            outstanding, self._calls = list(self._calls.values()), {}
        for pending in outstanding:
            pending.fail(self._unavailable(reason))
        if self._on_broken and not self._closing:
            self._on_broken(reason)
