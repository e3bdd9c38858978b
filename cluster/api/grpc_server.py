"""The client API (cluster/proto/pie.proto) served over gRPC in front of one InferletHost.

`serve(host, ...)` starts a server and returns a handle with its port and `stop()`. The servicer
maps the runtime's errors to gRPC status codes, here and nowhere else. A Launch stream holds one
server thread for the inferlet's life, so the thread pool has one thread per allowed running
inferlet plus a few for the other calls, which therefore never wait behind streams. However a
Launch call ends (the inferlet ends, the client cancels or disconnects, the server stops), the
inferlet is stopped and the host releases everything it held, unless the service was made with a
detach grace (a cluster's host behind its gateways): then a Launch stream that breaks without a
Terminate leaves the inferlet running for that long, its events held in a bounded replay buffer
(cluster/runtime/replay_outbox.py) for an Attach with the owner token its `started` event gave.
"""
from __future__ import annotations

import collections
import hmac
import logging
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
from wasmtime import component as wc

from cluster import metrics
from cluster.errors import (DirectoryUnavailable, HostBusy, InferletError, InvalidComponentError, NoLiveHost,
                            NoLiveWorker, ProgramTooLarge, UnknownInferlet, UnknownProgram)
from cluster.rpc.grpc_auth import BearerTokenAuth
from cluster.runtime.inferlet_host import InferletHost, Outcome, RunningInferlet
from cluster.api.program_store import ProgramStore
from cluster.proto import pie_pb2, pie_pb2_grpc
from cluster.rpc.remote_worker import WorkerUnavailable
from cluster.runtime.replay_outbox import Detached, NotInstanceOwner, ReplayGone, ReplayOutbox
from cluster.runtime.sandbox import MAX_COMPONENT_BYTES, Limits
from cluster.runtime.session import InferletEnded
from cluster.runtime.wit_values import Refused

log = logging.getLogger("pie.grpc")

DEFAULT_PORT = 50051
DEFAULT_MAX_RUNNING = 224  # inferlets running at once through one server
UNARY_THREADS = 32  # server threads beyond one per running inferlet: uploads, sends, lists, refusals
ENDED_REMEMBERED = 4096  # ended instance ids kept, so a late Send says "ended" rather than "unknown"
KEEPALIVE_MS = 30_000  # ping an idle connection this often, so a vanished client is noticed
RECENT_FAILURES = 20  # failed inferlets the status page lists
ATTACHABLE_ENDED = 256  # ended inferlets whose last events an Attach can still fetch
ATTACHABLE_FOR_S = 120.0  # ... for this long after their end

# the runtime's errors -> status codes; a subclass is listed before its base
_STATUS_OF = (
    (ProgramTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidComponentError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownProgram, grpc.StatusCode.NOT_FOUND),
    (UnknownInferlet, grpc.StatusCode.NOT_FOUND),
    (NotInstanceOwner, grpc.StatusCode.PERMISSION_DENIED),
    (ReplayGone, grpc.StatusCode.OUT_OF_RANGE),
    (HostBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InferletEnded, grpc.StatusCode.FAILED_PRECONDITION),
    (Refused, grpc.StatusCode.RESOURCE_EXHAUSTED),  # a message too large, an inbox full
    (NoLiveWorker, grpc.StatusCode.UNAVAILABLE),  # cluster mode: every worker is down or still loading
    (NoLiveHost, grpc.StatusCode.UNAVAILABLE),  # cluster mode: every inferlet host is down or draining
    (DirectoryUnavailable, grpc.StatusCode.UNAVAILABLE),
    (WorkerUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(error: InferletError) -> grpc.StatusCode:
    relayed = getattr(error, "status_code", None)  # a refusal a cluster host gave, passed on as it was
    if isinstance(relayed, grpc.StatusCode):
        return relayed
    for kind, code in _STATUS_OF:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _refuse(context: grpc.ServicerContext, error: InferletError):
    context.abort(status_of(error), str(error))  # raises


class TokenLatency:
    """TTFT and inter-token latency of one request, one message (or text chunk) at a time."""

    def __init__(self, api: str):
        self.start = self.last = time.monotonic()
        self.first = True
        self.ttft, self.itl = metrics.TTFT_SECONDS.labels(api), metrics.ITL_SECONDS.labels(api)

    def message(self) -> None:
        now = time.monotonic()
        (self.ttft if self.first else self.itl).observe(now - self.last)
        self.first, self.last = False, now


def cache_scope(request: pie_pb2.LaunchRequest) -> str:
    """Whose prefix-cache pages a launch may reuse: the same program's, under the same tenant."""
    return f"{request.program_id}/{request.tenant}"


@dataclass
class _Live:
    running: RunningInferlet
    program_id: str  # what it runs
    started: float  # time.monotonic() at launch
    api: str  # "grpc" or "openai"
    events: ReplayOutbox | None = None  # a Launch's events (an Attach reads them); None: the OpenAI API's
    owner_token: str = ""  # what an Attach must give


@dataclass(frozen=True)
class Failure:
    """An inferlet that ended with an error, for the status page (its cause's last line only)."""

    instance_id: str
    program_id: str
    ended: float  # time.time()
    cause: str


def _ended_cause(outcome: Outcome, live: "_Live | None") -> str:
    if outcome.ok:
        return "finished"
    return "stopped" if live is not None and getattr(live.running, "stop_reason", None) else "failed"


class InferletService(pie_pb2_grpc.InferletsServicer):
    def __init__(self, host: InferletHost, store: ProgramStore, max_running: int = DEFAULT_MAX_RUNNING,
                 detach_grace_s: float = 0.0):
        """`detach_grace_s`: how long an inferlet whose Launch (or Attach) stream broke without a
        Terminate keeps running for an Attach; 0: it is stopped at once (a client that goes away)."""
        self.host = host
        self.detach_grace_s = detach_grace_s
        self.sandbox = host.sandbox  # compiles uploads, to refuse what is not an inferlet at once
        self.store = store
        self.max_running = max_running
        self._components: dict[str, wc.Component] = {}  # program id -> compiled, validated component
        self._live: dict[str, _Live] = {}  # instance id -> running inferlet
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._attachable: collections.OrderedDict[str, tuple[_Live, float]] = collections.OrderedDict()
        self._starting = 0  # launches under way, not yet in _live
        self._lock = threading.Lock()
        self.failures: collections.deque[Failure] = collections.deque(maxlen=RECENT_FAILURES)

    # -- programs --------------------------------------------------------------------------------
    def _compile(self, path: Path) -> wc.Component:
        component = self.sandbox.load(path)
        if component.get_export_index("run") is None:
            raise InvalidComponentError("the component exports no `run` function: it is not built for the "
                                        "inferlet world; build it with `pie build`")
        return component

    def _program_path(self, program_id: str) -> Path:
        """The stored program (a cluster gateway fetches one another gateway stored); UnknownProgram."""
        return self.store.path(program_id)

    def _component(self, program_id: str) -> wc.Component:
        with self._lock:
            component = self._components.get(program_id)
        if component is None:
            component = self._compile(self._program_path(program_id))  # stored by an earlier server
            with self._lock:
                self._components[program_id] = component
        return component

    def Upload(self, request_iterator: Iterator[pie_pb2.UploadChunk], context) -> pie_pb2.ProgramRef:
        try:
            parts, size, declared, total_size = [], 0, "", 0
            for i, chunk in enumerate(request_iterator):
                if i == 0:
                    declared, total_size = chunk.sha256.lower(), chunk.total_size
                    self.store.check_size(total_size)
                    if declared and self._holds(declared):  # the same bytes again: no need to read them
                        return pie_pb2.ProgramRef(program_id=declared, already_present=True,
                                                  size=self.store.path(declared).stat().st_size)
                size += len(chunk.data)
                self.store.check_size(size)  # before holding more of an oversized upload
                parts.append(chunk.data)
            if declared and size == 0 and total_size > 0:  # the digest alone, to ask whether it is held
                raise UnknownProgram(f"this server does not hold {declared}: send the component's bytes")
            stored = self._store(b"".join(parts), declared)
            return pie_pb2.ProgramRef(program_id=stored.program_id, size=stored.size,
                                      already_present=stored.already_present)
        except InferletError as e:
            _refuse(context, e)

    def _holds(self, program_id: str) -> bool:
        """Whether the program is stored (and then compiled), here or where this service fetches from."""
        try:
            self._component(program_id)
            return True
        except UnknownProgram:
            return False

    def _store(self, data: bytes, declared: str = ""):
        """Store and compile a component (refusing what is not an inferlet); its StoredProgram."""
        compiled = []
        stored = self.store.put(data, declared, validate=lambda p: compiled.append(self._compile(p)))
        component = compiled[0] if compiled else self._component(stored.program_id)
        with self._lock:
            self._components[stored.program_id] = component
        return stored

    def add_program(self, data: bytes) -> str:
        """Upload a component from inside the server (a built-in inferlet); its program id."""
        return self._store(data).program_id

    def model_name(self) -> str:
        return self._capacity()["model"]

    # -- running inferlets -----------------------------------------------------------------------
    def start(self, program_id: str, arguments: list[str], events, prompt_hint: str = "",
              tenant: str = "") -> RunningInferlet:
        """Launch a stored program from inside the server (the OpenAI API): as Launch does, with
        its messages and then its Outcome put on `events` (anything with put()); refusals raise."""
        request = pie_pb2.LaunchRequest(program_id=program_id, arguments=arguments, prompt_hint=prompt_hint,
                                        tenant=tenant)
        return self._start(self._component(program_id), request, events, api="openai")

    def _start(self, component: wc.Component, request: pie_pb2.LaunchRequest, events,
               api: str = "grpc", owner_token: str = "") -> RunningInferlet:
        def ended(outcome: Outcome) -> None:  # on the scheduler thread (or a relay's)
            with self._lock:
                live = self._live.pop(outcome.instance_id, None)
                self._ended[outcome.instance_id] = None
                while len(self._ended) > ENDED_REMEMBERED:
                    self._ended.popitem(last=False)
                if live is not None and live.events is not None:  # its last events stay attachable a while
                    self._attachable[outcome.instance_id] = (live, time.monotonic())
                    while len(self._attachable) > ATTACHABLE_ENDED:
                        self._attachable.popitem(last=False)
            self._instance_ended(outcome.instance_id)
            cause = _ended_cause(outcome, live)
            metrics.INFERLETS_RUNNING.dec()
            metrics.INFERLETS_ENDED.labels(cause).inc()
            if cause == "failed":
                last_line = outcome.error.strip().splitlines()[-1] if outcome.error.strip() else "(no message)"
                self.failures.append(Failure(outcome.instance_id, request.program_id, time.time(), last_line[:300]))
            events.put(outcome)

        with self._lock:
            if len(self._live) + self._starting >= self.max_running:
                raise HostBusy(f"this server already runs {len(self._live) + self._starting} inferlets, its "
                               f"limit; retry when some have ended")
            self._starting += 1
        t0 = time.monotonic()
        metrics.INFERLETS_RUNNING.inc()  # before it can end
        try:  # outside the lock: a cluster gateway's launch waits for a host
            running = self._launch(component, request, events.put, ended)
        except BaseException:
            metrics.INFERLETS_RUNNING.dec()
            with self._lock:
                self._starting -= 1
            raise
        metrics.INFERLETS_LAUNCHED.labels(api).inc()
        metrics.LAUNCH_SECONDS.observe(time.monotonic() - t0)
        owner_token = getattr(running, "owner_token", None) or owner_token  # a relayed one's is its host's
        with self._lock:  # one step from starting to live, so no other launch slips past the limit between
            self._starting -= 1
            if running.instance_id not in self._ended:  # it may have ended already
                self._live[running.instance_id] = _Live(running, request.program_id, t0, api,
                                                        events if isinstance(events, ReplayOutbox) else None,
                                                        owner_token)
        self._instance_started(running.instance_id, request, owner_token)
        return running

    def _instance_started(self, instance_id: str, request: pie_pb2.LaunchRequest, owner_token: str) -> None:
        """An inferlet started here (a cluster host records it in the directory's instance table)."""

    def _instance_ended(self, instance_id: str) -> None:
        """An inferlet that ran here ended."""

    def live(self) -> list[tuple[str, str, float, str]]:
        """(instance id, program id, seconds running, api) of each running inferlet."""
        now = time.monotonic()
        with self._lock:
            return [(iid, x.program_id, now - x.started, x.api) for iid, x in self._live.items()]

    def activity(self, instance_id: str) -> tuple[int | None, str | None]:
        """(tokens submitted, state) of a running inferlet where its host is this process, else Nones."""
        with self._lock:
            live = self._live.get(instance_id)
        report = getattr(live.running, "activity", None) if live is not None else None
        return report() if report is not None else (None, None)

    def _launch(self, component: wc.Component, request: pie_pb2.LaunchRequest,
                on_message: Callable[[str], None], on_end: Callable[[Outcome], None]) -> RunningInferlet:
        """Start the inferlet (cluster mode overrides where and how)."""
        return self.host.launch(component, list(request.arguments), on_message=on_message, on_end=on_end,
                                cache_scope=cache_scope(request), keep_messages=False)

    def outbox_bounds(self) -> tuple[int, int]:
        """(messages, bytes) a client's unread events may reach before the inferlet's send waits."""
        limits = getattr(self.host, "limits", None) or Limits()
        return limits.max_outbox_messages, limits.max_outbox_bytes

    def Launch(self, request: pie_pb2.LaunchRequest, context) -> Iterator[pie_pb2.Event]:
        latency = TokenLatency("grpc")
        events = ReplayOutbox(*self.outbox_bounds())  # send waits while the client lags
        owner_token = secrets.token_urlsafe(18)
        try:
            running = self._start(self._component(request.program_id), request, events, owner_token=owner_token)
        except InferletError as e:
            _refuse(context, e)
        owner_token = getattr(running, "owner_token", None) or owner_token  # as _start recorded it
        self._watch_stream(context, running, events, events.reader)
        yield pie_pb2.Event(started=pie_pb2.Started(instance_id=running.instance_id, owner_token=owner_token), seq=0)
        yield from self._stream(events, events.reader, context, latency)

    def Attach(self, request: pie_pb2.AttachRequest, context) -> Iterator[pie_pb2.Event]:
        try:
            live = self._attach_target(request.instance_id)
            if not request.owner_token or not hmac.compare_digest(live.owner_token, request.owner_token):
                raise NotInstanceOwner(f"the owner token given is not inferlet {request.instance_id}'s: give the "
                                       f"owner_token of its Launch's `started` event")
            reader = live.events.attach(request.from_seq)
        except InferletError as e:
            _refuse(context, e)
        self._watch_stream(context, live.running, live.events, reader)
        yield from self._stream(live.events, reader, context)

    def _attach_target(self, instance_id: str) -> _Live:
        """The running or recently ended inferlet an Attach names, with its events."""
        now = time.monotonic()
        with self._lock:
            live = self._live.get(instance_id)
            if live is None and instance_id in self._attachable:
                live, ended_at = self._attachable[instance_id]
                if now - ended_at > ATTACHABLE_FOR_S:
                    del self._attachable[instance_id]
                    live = None
        if live is None:
            self._find(instance_id)  # raises: ended long ago, or unknown
        if live.events is None:
            raise UnknownInferlet(f"inferlet {instance_id} was started by the OpenAI API: it has no event stream "
                                  f"to attach to")
        return live

    def _watch_stream(self, context, running: RunningInferlet, events: ReplayOutbox, reader: int) -> None:
        """When the call ends however it ends: stop the inferlet (no detach grace) or give it the grace."""
        def gone():
            if running.done or events.reader != reader:
                return  # it ended, or a newer Attach took its events over
            if self.detach_grace_s <= 0:
                running.stop("its client went away")
            else:
                log.info("%s: its event stream broke; it runs on for %.0f s awaiting an Attach",
                         running.instance_id, self.detach_grace_s)
                timer = threading.Timer(self.detach_grace_s, abandoned)
                timer.daemon = True
                timer.start()

        def abandoned():
            if not running.done and events.reader == reader:
                running.stop(f"its event stream broke and no client attached within {self.detach_grace_s:.0f} s")

        if not context.add_callback(gone):
            gone()  # the call had already ended

    def _stream(self, events: ReplayOutbox, reader: int, context, latency: TokenLatency | None = None
                ) -> Iterator[pie_pb2.Event]:
        """A reader's events, each with its seq, through the inferlet's end."""
        while True:
            try:
                seq, item = events.next(reader)
            except Detached:
                context.abort(grpc.StatusCode.ABORTED, "another client attached to this inferlet's events (Attach): "
                                                       "this stream ends here")
            if isinstance(item, Outcome):
                if item.ok:
                    yield pie_pb2.Event(finished=pie_pb2.Finished(), seq=seq)
                else:
                    yield pie_pb2.Event(failed=pie_pb2.Failed(error=item.error), seq=seq)
                return
            if latency is not None:
                latency.message()
            yield pie_pb2.Event(message=pie_pb2.Message(text=item), seq=seq)

    def _find(self, instance_id: str) -> _Live:
        with self._lock:
            live = self._live.get(instance_id)
            if live is not None:
                return live
            if instance_id in self._ended:
                raise InferletEnded(f"inferlet {instance_id} has ended")
        raise UnknownInferlet(f"no inferlet {instance_id!r} runs on this server; "
                              f"use the instance id of a Launch's `started` event")

    def Send(self, request: pie_pb2.SendRequest, context) -> pie_pb2.Empty:
        try:
            self._find(request.instance_id).running.send(request.text)
        except InferletError as e:
            _refuse(context, e)
        return pie_pb2.Empty()

    def Terminate(self, request: pie_pb2.TerminateRequest, context) -> pie_pb2.Empty:
        try:
            self._find(request.instance_id).running.stop("terminated by its client")
        except InferletError as e:
            _refuse(context, e)
        return pie_pb2.Empty()

    def List(self, request: pie_pb2.Empty, context) -> pie_pb2.InferletList:
        now = time.monotonic()
        with self._lock:
            live = list(self._live.items())
        return pie_pb2.InferletList(inferlets=[
            pie_pb2.InferletInfo(instance_id=iid, program_id=x.program_id, seconds_running=now - x.started)
            for iid, x in live])

    def Health(self, request: pie_pb2.Empty, context) -> pie_pb2.HealthReply:
        return pie_pb2.HealthReply(status="serving", running=self._running_count(), **self._capacity())

    def _running_count(self) -> int:
        """Inferlets launched through this service and not yet ended (a cluster gateway: through any)."""
        with self._lock:
            return len(self._live)

    def _capacity(self) -> dict:
        """The model and KV pages behind this service: HealthReply's model, free_pages, total_pages, cached_pages."""
        worker = self.host.worker
        return {"model": worker.info.name, "free_pages": worker.num_free_pages, "total_pages": worker.info.num_pages,
                "cached_pages": worker.pages.num_cached()}


class PieServer:
    """A started server: `port` is the bound port (useful after asking for port 0)."""

    def __init__(self, server: grpc.Server, service: InferletService, address: str, port: int):
        self.service = service
        self.address = address
        self.port = port
        self._server = server

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; False on timeout."""
        return self._server.wait_for_termination(timeout) is False

    def stop(self, grace: float | None = 2.0) -> None:
        """Refuse new calls, give running ones `grace` seconds, then cancel them (which stops their inferlets)."""
        self._server.stop(grace).wait()


def serve(host: InferletHost, port: int = DEFAULT_PORT, address: str = "127.0.0.1", token: str | None = None,
          max_running: int = DEFAULT_MAX_RUNNING, max_component_bytes: int = MAX_COMPONENT_BYTES,
          store: ProgramStore | None = None) -> PieServer:
    """Serve the client API for `host` on address:port (port 0: any free port) until stop()."""
    if max_running < 1:
        raise ValueError(f"max_running must be at least 1, not {max_running}")
    service = InferletService(host, store or ProgramStore(max_bytes=max_component_bytes), max_running)
    return serve_service(service, port, address, token)


def serve_service(service: InferletService, port: int = DEFAULT_PORT, address: str = "127.0.0.1",
                  token: str | None = None) -> PieServer:
    """Serve a built InferletService (or a subclass: cluster mode's host and gateway services)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=service.max_running + UNARY_THREADS, thread_name_prefix="pie-grpc"),
        interceptors=[BearerTokenAuth(token)] if token else [],
        options=[("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 10_000),
                 ("grpc.so_reuseport", 0)])
    pie_pb2_grpc.add_InferletsServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(f"{address}:{port}")
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}:{port}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot listen on {address}:{port} (in use, or not an address of this machine)")
    server.start()
    log.info("serving the client API on %s:%d", address, bound)
    return PieServer(server, service, address, bound)
