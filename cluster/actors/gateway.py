"""The cluster's client API: the same pie.v1.Inferlets service, relaying each inferlet to a host.

GatewayService is the embedded InferletService (uploads, limits, status codes, Send, Terminate,
List, ending on disconnect) with launching replaced: it picks the inferlet host running the
fewest of its inferlets, hands it the program (once per host), and launches there with the
client's arguments and prompt hint; the host asks the directory which worker runs it. A relay
thread forwards the host's events. When a host dies mid-run, its inferlets' clients get
`failed` naming the host, the directory drops what they owned (their workers released their
pages when the host's handler-call streams ended), and the next launch on that host reaches it
again once Ray restarted it.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc
from wasmtime import component as wc

from cluster import metrics
from cluster.errors import InferletError
from cluster.api.grpc_client import Failed, Finished, Message, PieClient, RequestFailed, Started
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, InferletService
from cluster.runtime.inferlet_host import Outcome
from cluster.api.program_store import ProgramStore
from cluster.proto import pie_pb2
from cluster.runtime.sandbox import Sandbox

log = logging.getLogger("pie.gateway")
GATHER_TIMEOUT_S = 5.0  # how long /metrics and the status page wait for the actors' answers

_HOST_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
ANSWER_TIMEOUT_S = 2.0  # a host that fails a call is taken for dead only if it does not answer a List in this


class HostLink:
    """One inferlet host as the gateway sees it. `locate()` answers (host_id, target) and may block
    until a restarted host is up again."""

    def __init__(self, locate: Callable[[], tuple[str, str]], token: str | None = None):
        """`token`: the hosts' (the cluster's internal token)."""
        self._locate = locate
        self._token = token
        self._lock = threading.Lock()
        self.running = 0  # inferlets this gateway runs there now
        self.client: PieClient | None = None
        self.host_id = self.target = ""
        self._uploaded: set[str] = set()

    def connected(self) -> PieClient:
        with self._lock:
            if self.client is None:
                try:
                    self.host_id, self.target = self._locate()
                except Exception as e:  # a Ray error: the host actor is down or restarting
                    raise RequestFailed("Launch", "an inferlet host actor", grpc.StatusCode.UNAVAILABLE,
                                        f"the inferlet host is down or restarting ({type(e).__name__}: "
                                        f"{str(e)[:200]}); retry shortly") from None
                self.client = PieClient(self.target, token=self._token, timeout_s=60.0)
                self._uploaded = set()
            return self.client

    def ensure_program(self, program_id: str, path) -> None:
        client = self.connected()
        if program_id not in self._uploaded:
            client.upload(path, sha256=program_id)
            self._uploaded.add(program_id)

    def answers(self) -> bool:
        """Whether the host answers a List within ANSWER_TIMEOUT_S."""
        client = self.client
        try:
            return client is not None and client.list(timeout_s=ANSWER_TIMEOUT_S) is not None
        except RequestFailed:
            return False

    def lost(self, host_id: str) -> bool:
        """The host `host_id` stopped answering: dial again next time. True for the first report."""
        with self._lock:
            if self.client is None or self.host_id != host_id:
                return False
            self.client.close()
            self.client = None
            return True


class RelayedInferlet:
    """A RunningInferlet's face for an inferlet that runs on a host: send, stop, done."""

    def __init__(self, instance_id: str, client: PieClient, stream):
        self.instance_id = instance_id
        self._client, self._stream = client, stream
        self._finished = threading.Event()
        self.stop_reason: str | None = None  # why stop() was called, if it was

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def send(self, message: str) -> None:
        try:
            self._client.send(self.instance_id, message)
        except RequestFailed as e:
            raise _RelayedRefusal(e.code, e.details) from None

    def stop(self, reason: str = "its client stopped it") -> None:
        if self.done:
            return
        self.stop_reason = reason
        try:
            self._client.terminate(self.instance_id)
        except RequestFailed:
            pass  # it ended meanwhile, or its host is gone: the stream ends either way
        self._stream.cancel()


class _RelayedRefusal(InferletError):
    """A host refused a call; `status_code` is its status, passed on to the client as it is."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.status_code = code


class GatewayService(InferletService):
    def __init__(self, hosts: list[HostLink], directory, store: ProgramStore,
                 max_running: int = DEFAULT_MAX_RUNNING, sandbox: Sandbox | None = None):
        """`directory`: a Directory or DirectoryHandle (for health and reclaiming dead hosts)."""
        if not hosts:
            raise ValueError("a gateway needs at least one inferlet host")
        self.links = hosts
        self.directory = directory
        self.sandbox = sandbox or Sandbox()
        super().__init__(host=self, store=store, max_running=max_running)

    # -- what /metrics and the status page gather from the actors -----------------------------------
    def _gather(self, method: str, workers_only: bool = False) -> dict[str, object]:
        """Each live actor's answer to `method` by its name (worker-i, host-i), waiting at most
        GATHER_TIMEOUT_S for all; an actor that is down or restarting is left out."""
        import ray

        cluster = getattr(self, "cluster", None)  # set by Cluster.gateway_service
        if cluster is None:
            return {}
        actors = [(f"worker-{i}", w) for i, w in enumerate(cluster.workers)]
        actors += [] if workers_only else [(f"host-{i}", h) for i, h in enumerate(cluster.hosts)]
        refs = {getattr(actor, method).remote(): name for name, actor in actors}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=GATHER_TIMEOUT_S)
        answers = {}
        for ref in ready:
            try:
                answers[refs[ref]] = ray.get(ref)
            except ray.exceptions.RayError as e:
                log.info("left %s out of the gathered %s: %s", refs[ref], method, e)
        return answers

    def metrics_sources(self) -> list[tuple[str, str]]:
        """(process, its exposition): the gateway's own, then every live worker's and host's."""
        return [("gateway", metrics.exposition().decode()), *sorted(self._gather("metrics_text").items())]

    def worker_steps(self) -> dict[str, list]:
        """Each live worker's last steps, by worker id (the status page's charts)."""
        return self._gather("recent_steps", workers_only=True)

    # -- launching on a host ---------------------------------------------------------------------
    def _launch(self, component: wc.Component, request: pie_pb2.LaunchRequest,
                on_message: Callable[[str], None], on_end: Callable[[Outcome], None]) -> RelayedInferlet:
        tried: list[HostLink] = []
        for attempt in range(2):  # a host found dead is reported, and the launch tried once more, elsewhere
            with self._lock:  # counted from here, so concurrent launches spread over the hosts
                link = min([x for x in self.links if x not in tried] or self.links, key=lambda x: x.running)
                link.running += 1
            tried.append(link)
            try:
                return self._launch_on(link, request, on_message, on_end)
            except BaseException as e:
                with self._lock:
                    link.running -= 1
                if not isinstance(e, RequestFailed):
                    raise
                if e.code in _HOST_GONE and attempt == 0:
                    self._host_lost(link, link.host_id, e)
                    continue
                raise _RelayedRefusal(e.code, e.details) from None  # the host's refusal, as it gave it
        raise AssertionError("unreachable")

    def _launch_on(self, link: HostLink, request: pie_pb2.LaunchRequest, on_message, on_end) -> RelayedInferlet:
        """Start the inferlet on `link` (its slot already counted there) and relay its events."""
        link.ensure_program(request.program_id, self.store.path(request.program_id))
        client, host_id = link.connected(), link.host_id
        stream = client.launch(request.program_id, list(request.arguments), prompt_hint=request.prompt_hint,
                               tenant=request.tenant)
        events = iter(stream)
        first = next(events, None)
        if not isinstance(first, Started):  # refused without an error status: should not happen
            raise RequestFailed("Launch", link.target, grpc.StatusCode.INTERNAL, f"the host answered {first!r}")
        running = RelayedInferlet(first.instance_id, client, stream)
        threading.Thread(target=self._relay, args=(running, link, host_id, events, on_message, on_end),
                         name=f"relay-{first.instance_id}", daemon=True).start()
        return running

    def _relay(self, running: RelayedInferlet, link: HostLink, host_id: str, events, on_message, on_end) -> None:
        outcome = Outcome(running.instance_id, error="the host ended the stream without an outcome")
        try:
            for event in events:
                if isinstance(event, Message):
                    room = on_message(event.text)
                    # the client's outbox is full: read no more from the host until it has room (gRPC's
                    # flow control then holds the host's send), or the client stops the inferlet
                    while room is not None and not room.done and not running._stream.cancelled:
                        try:
                            room.wait(1.0)
                        except TimeoutError:
                            pass
                elif isinstance(event, Finished):
                    outcome.error = None
                elif isinstance(event, Failed):
                    outcome.error = event.error
        except RequestFailed as e:
            if running._stream.cancelled:
                outcome.error = "stopped by its client"
            else:
                outcome.error = (f"the inferlet host {host_id} at {link.target} failed while running it "
                                 f"({e.code.name}: {e.details})")
                if e.code in _HOST_GONE:
                    self._host_lost(link, host_id, e)
        finally:
            with self._lock:
                link.running -= 1
            running._finished.set()
            on_end(outcome)

    def _host_lost(self, link: HostLink, host_id: str, error: RequestFailed) -> None:
        if link.answers():
            log.warning("inferlet host %s at %s failed a call but answers: %s", host_id, link.target, error)
            return  # the host lives (the failure was something else): its inferlets stay its own
        if not link.lost(host_id):
            return  # already reported
        log.warning("inferlet host %s at %s is gone: %s", host_id, link.target, error)
        try:
            reclaimed = self.directory.host_died(host_id)
            log.info("host %s: %d inferlets ended in the directory", host_id, len(reclaimed.owners))
        except Exception as e:
            log.warning("could not report host %s to the directory: %r", host_id, e)

    # -- the rest of the API ---------------------------------------------------------------------
    def _capacity(self) -> dict:
        return self.directory.capacity()
