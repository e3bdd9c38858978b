"""The cluster's client API: the same pie.v1.Inferlets service, relaying each inferlet to a host.

GatewayService is the embedded InferletService (uploads, limits, status codes, Send, Terminate,
List, ending on disconnect) with launching replaced, and with no state of its own that another
gateway would need: any number of gateways (Serve replicas) serve one cluster.

- Programs: an upload is checked and compiled here, and its bytes are put in the directory
  (content-addressed); a gateway asked for a program it does not hold fetches it from there.
- Launch: the directory picks the host running the fewest inferlets (`pick_host`, which counts the
  pick, so launches through several gateways spread); the gateway hands the host the program (once
  per host) and launches there with the client's arguments and prompt hint; the host asks the
  directory which worker runs it, and records the inferlet in the directory's instance table. A
  relay thread forwards the host's events.
- Send, Terminate, List and Attach find the inferlet in that table, whichever gateway launched it.
- A gateway that dies costs only the streams it relayed: their hosts keep the inferlets running
  for a grace period, holding their recent events, and the client attaches again through another.
- When a host dies mid-run, its inferlets' clients get `failed` naming the host, and the directory
  drops it and what its inferlets owned (their workers released their pages when the host's
  handler-call streams ended). Ray restarts it under a new id, and it reports itself again.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc
from wasmtime import component as wc

from cluster import metrics
from cluster.errors import HostBusy, InferletError, UnknownProgram
from cluster.api.grpc_client import Failed, Finished, Message, PieClient, RequestFailed, Started
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, InferletService, _Live, _refuse
from cluster.runtime.inferlet_host import Outcome
from cluster.runtime.session import InferletEnded
from cluster.api.program_store import ProgramStore
from cluster.proto import pie_pb2
from cluster.runtime.sandbox import Sandbox
from cluster.actors.directory_actor import NAMESPACE

log = logging.getLogger("pie.gateway")
GATHER_TIMEOUT_S = 5.0  # how long /metrics and the status page wait for the actors' answers

_HOST_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
ANSWER_TIMEOUT_S = 2.0  # a host that fails a call is taken for dead only if it does not answer a List in this
HOST_CALL_TIMEOUT_S = 60.0
LINKS_CHECK_S = 60.0  # how often a launch first closes the links to hosts that are gone


class HostLink:
    """One inferlet host as this gateway sees it: one channel, and the programs it was handed."""

    def __init__(self, host_id: str, target: str, token: str | None = None):
        """`token`: the hosts' (the cluster's internal token)."""
        self.host_id, self.target = host_id, target
        self.client = PieClient(target, token=token, timeout_s=HOST_CALL_TIMEOUT_S)
        self._lock = threading.Lock()
        self._uploaded: set[str] = set()

    def ensure_program(self, program_id: str, path) -> None:
        if program_id not in self._uploaded:
            self.client.upload(path, sha256=program_id)
            with self._lock:
                self._uploaded.add(program_id)

    def answers(self) -> bool:
        """Whether the host answers a List within ANSWER_TIMEOUT_S."""
        try:
            return self.client.list(timeout_s=ANSWER_TIMEOUT_S) is not None
        except (RequestFailed, ValueError):  # ValueError: another thread closed the channel, finding it dead
            return False


class RemoteInstance:
    """A RunningInferlet's face (send, stop) for an inferlet on a host, through `client` (the host's)."""

    def __init__(self, instance_id: str, client: PieClient):
        self.instance_id, self._client = instance_id, client
        self.stop_reason: str | None = None  # why stop() was called, if it was

    @property
    def done(self) -> bool:
        return False  # not known here: the host answers FAILED_PRECONDITION once it has ended

    def send(self, message: str) -> None:
        try:
            self._client.send(self.instance_id, message)
        except RequestFailed as e:
            raise _RelayedRefusal(e.code, e.details) from None

    def stop(self, reason: str = "its client stopped it") -> None:
        self.stop_reason = reason
        try:
            self._client.terminate(self.instance_id)
        except RequestFailed as e:
            raise _RelayedRefusal(e.code, e.details) from None


class RelayedInferlet(RemoteInstance):
    """An inferlet this gateway launched, whose events it relays: stopping it also ends the relay."""

    def __init__(self, instance_id: str, client: PieClient, stream, owner_token: str = ""):
        super().__init__(instance_id, client)
        self.owner_token = owner_token  # the host's: an Attach through any gateway goes to the host
        self._stream = stream
        self._finished = threading.Event()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def stop(self, reason: str = "its client stopped it") -> None:
        if self.done:
            return
        try:
            super().stop(reason)
        except _RelayedRefusal:
            pass  # it ended meanwhile, or its host is gone: the stream ends either way
        self._stream.cancel()


class _RelayedRefusal(InferletError):
    """A host refused a call; `status_code` is its status, passed on to the client as it is."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.status_code = code


class GatewayService(InferletService):
    def __init__(self, directory, store: ProgramStore, max_running: int = DEFAULT_MAX_RUNNING,
                 sandbox: Sandbox | None = None, internal_token: str | None = None,
                 wait_for_host: Callable[[], bool] | None = None):
        """`directory`: a Directory or DirectoryHandle (hosts, instances, programs, health). `internal_token`:
        what the hosts require. `wait_for_host`: called when every host is full; True once there may be
        room (the elastic pool added a host), False when there will be none."""
        self.directory = directory
        self.sandbox = sandbox or Sandbox()
        self._internal_token = internal_token
        self._wait_for_host = wait_for_host
        self._links: dict[str, HostLink] = {}  # host id -> link
        self._links_checked = time.monotonic()
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
        if not workers_only:
            for i, host in enumerate(h for h in self.directory.hosts() if h.actor_name):
                try:
                    actors.append((f"host-{i}", ray.get_actor(host.actor_name, namespace=NAMESPACE)))
                except ValueError:
                    pass  # removed meanwhile
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

    # -- programs: stored here, shared through the directory -----------------------------------------
    def _program_path(self, program_id: str):
        try:
            return self.store.path(program_id)
        except UnknownProgram:
            data = self.directory.program(program_id)  # another gateway stored it; UnknownProgram if none did
            return self.store.put(data, program_id).path

    def _store(self, data: bytes, declared: str = ""):
        stored = super()._store(data, declared)
        if not self.directory.has_program(stored.program_id):
            self.directory.put_program(stored.program_id, data)
        return stored

    # -- launching on a host -----------------------------------------------------------------------
    def _link(self, host_id: str, target: str) -> HostLink:
        with self._lock:
            link = self._links.get(host_id)
            if link is None or link.target != target:
                if link is not None:
                    link.client.close()
                link = self._links[host_id] = HostLink(host_id, target, self._internal_token)
            return link

    def _forget_gone_hosts(self, live: set[str]) -> None:
        """Close the links to hosts no longer in the directory (the elastic pool removed them, or they died)."""
        with self._lock:
            gone = [self._links.pop(h) for h in list(self._links) if h not in live]
        for link in gone:
            link.client.close()

    def _launch(self, component: wc.Component, request: pie_pb2.LaunchRequest,
                on_message: Callable[[str], None], on_end: Callable[[Outcome], None]) -> RelayedInferlet:
        if time.monotonic() - self._links_checked > LINKS_CHECK_S:
            self._links_checked = time.monotonic()
            self._forget_gone_hosts({h.host_id for h in self.directory.hosts()})
        tried: list[str] = []
        for attempt in range(2):  # a host found dead is reported, and the launch tried once more, elsewhere
            pick = self._pick_host(tuple(tried))
            tried.append(pick.host_id)
            link = self._link(pick.host_id, pick.target)
            try:
                return self._launch_on(link, request, on_message, on_end)  # the host records it: the pick settles
            except BaseException as e:
                self._unpick(pick.host_id)
                if not isinstance(e, RequestFailed):
                    raise
                if e.code in _HOST_GONE and attempt == 0:
                    self._host_lost(link, e)
                    continue
                raise _RelayedRefusal(e.code, e.details) from None  # the host's refusal, as it gave it
        raise AssertionError("unreachable")

    def _pick_host(self, exclude: tuple[str, ...]):
        """The directory's pick; when every host is full, the elastic pool's new host (if it can add one)."""
        try:
            return self.directory.pick_host(exclude)
        except HostBusy:
            if self._wait_for_host is None or not self._wait_for_host():
                raise
            return self.directory.pick_host(exclude)

    def _unpick(self, host_id: str) -> None:
        try:
            self.directory.unpick_host(host_id)
        except Exception as e:  # forgotten after PICK_TTL_S anyway
            log.info("could not give back the pick of host %s: %r", host_id, e)

    def _launch_on(self, link: HostLink, request: pie_pb2.LaunchRequest, on_message, on_end) -> RelayedInferlet:
        """Start the inferlet on `link` and relay its events."""
        link.ensure_program(request.program_id, self._program_path(request.program_id))
        stream = link.client.launch(request.program_id, list(request.arguments), prompt_hint=request.prompt_hint,
                                    tenant=request.tenant)
        events = iter(stream)
        first = next(events, None)
        if not isinstance(first, Started):  # refused without an error status: should not happen
            raise RequestFailed("Launch", link.target, grpc.StatusCode.INTERNAL, f"the host answered {first!r}")
        running = RelayedInferlet(first.instance_id, link.client, stream, first.owner_token)
        threading.Thread(target=self._relay, args=(running, link, events, on_message, on_end),
                         name=f"relay-{first.instance_id}", daemon=True).start()
        return running

    def _relay(self, running: RelayedInferlet, link: HostLink, events, on_message, on_end) -> None:
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
            elif e.code == grpc.StatusCode.ABORTED:
                outcome.error = f"another client attached to inferlet {running.instance_id} (Attach): {e.details}"
            else:
                outcome.error = (f"the inferlet host {link.host_id} at {link.target} failed while running it "
                                 f"({e.code.name}: {e.details})")
                if e.code in _HOST_GONE:
                    self._host_lost(link, e)
        finally:
            running._finished.set()
            on_end(outcome)

    def _host_lost(self, link: HostLink, error: RequestFailed) -> None:
        if link.answers():
            log.warning("inferlet host %s at %s failed a call but answers: %s", link.host_id, link.target, error)
            return  # the host lives (the failure was something else): its inferlets stay its own
        with self._lock:
            if self._links.get(link.host_id) is not link:
                return  # already reported
            del self._links[link.host_id]
        link.client.close()
        log.warning("inferlet host %s at %s is gone: %s", link.host_id, link.target, error)
        try:
            reclaimed = self.directory.host_died(link.host_id)
            log.info("host %s: %d inferlets ended in the directory", link.host_id, len(reclaimed.owners))
        except Exception as e:
            log.warning("could not report host %s to the directory: %r", link.host_id, e)

    # -- any gateway's inferlets, through the directory's instance table ---------------------------------
    def _find(self, instance_id: str) -> _Live:
        with self._lock:
            live = self._live.get(instance_id)
        if live is not None:
            return live
        record = self.directory.instance(instance_id)  # UnknownInferlet when the cluster never ran it
        if record.ended:
            raise InferletEnded(f"inferlet {instance_id} has ended")
        remote = RemoteInstance(instance_id, self._link(record.host_id, record.target).client)
        return _Live(remote, record.program_id, time.monotonic() - (time.time() - record.started), "grpc")

    def List(self, request: pie_pb2.Empty, context) -> pie_pb2.InferletList:
        try:
            records = self.directory.instances()
        except InferletError as e:
            _refuse(context, e)
        now = time.time()
        return pie_pb2.InferletList(inferlets=[
            pie_pb2.InferletInfo(instance_id=r.instance_id, program_id=r.program_id, seconds_running=now - r.started)
            for r in records])

    def _running_count(self) -> int:
        return len(self.directory.instances())

    def Attach(self, request: pie_pb2.AttachRequest, context):
        """Relay the host's Attach: the host holds the events and checks the owner token."""
        try:
            record = self.directory.instance(request.instance_id)
            link = self._link(record.host_id, record.target)
        except InferletError as e:
            _refuse(context, e)
        stream = link.client.attach(request.instance_id, request.owner_token, request.from_seq)
        if not context.add_callback(stream.cancel):  # the host keeps it for the next Attach
            stream.cancel()
        try:
            yield from stream.events_pb()
        except RequestFailed as e:
            if e.code in _HOST_GONE and not stream.cancelled:
                self._host_lost(link, e)
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"the inferlet host {link.host_id} at {link.target} is gone: {e.details}")
            context.abort(e.code, e.details)

    def _capacity(self) -> dict:
        return self.directory.capacity()
