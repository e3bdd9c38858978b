"""An inferlet host: runs many inferlets beside each other on one executor.

It owns the shared services (the worker: batcher and page registry; message bus, HTTP client, timers) and
the scheduler thread that runs every inferlet's wasm. `launch` returns at once with a handle
that streams what the inferlet sends, takes messages for it, can stop it, and waits for its
Outcome. However an inferlet ends (returns, raises, traps, hits a limit, is stopped),
everything it held is released and the outcome names the cause.
"""
from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from wasmtime import component as wc

from cluster.worker.batcher import BatchPolicy
from cluster.rpc.bus_service import RemoteBus
from cluster.errors import InvalidComponentError
from cluster.runtime.host_services import HostServices
from cluster.services.http_client import HttpClient, HttpPolicy
from cluster.runtime.inferlet_build import build
from cluster.worker.local_worker import LocalWorker
from cluster.services.messaging import BusLimits, MessageBus
from cluster.rpc.remote_worker import RemoteWorker
from cluster.runtime.sandbox import Limits, Sandbox
from cluster.runtime.scheduler import Scheduler, Task
from cluster.runtime.session import InferletSession
from cluster.services.timers import Timers
from workers.executor import Executor


@dataclass
class Outcome:
    instance_id: str
    messages: list[str] = field(default_factory=list)  # what it sent to its client, in order
    error: str | None = None  # None on success; else the cause, with the guest's traceback when it has one

    @property
    def ok(self) -> bool:
        return self.error is None


def load_component(sandbox: Sandbox, program: str | Path | wc.Component) -> wc.Component:
    """`program` compiled by `sandbox`: a .py source (built on demand, cached), a .wasm, or a component."""
    if isinstance(program, wc.Component):
        return program
    path = Path(program)
    if path.suffix == ".py":
        path = build(path)
    elif path.suffix != ".wasm":
        raise InvalidComponentError(f"{program}: expected a .py source or a .wasm component")
    return sandbox.load(path)


class RunningInferlet:
    def __init__(self, instance_id: str, host: "InferletHost", session: InferletSession, task: Task,
                 outcome: Outcome, finished: threading.Event):
        self.instance_id = instance_id
        self.outcome = outcome
        self.stop_reason: str | None = None  # why stop() was called, if it was
        self._host, self._session, self._task, self._finished = host, session, task, finished

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def host(self) -> "InferletHost":
        """The host whose scheduler runs it."""
        return self._host

    def send(self, message: str) -> None:
        """A message from the client; the inferlet reads it with receive(). Raises Refused when it
        is too large, the inbox is full, or the inferlet has ended."""
        self._session.deliver(message)

    def activity(self) -> tuple[int, str]:
        """(input tokens its passes have submitted, "waiting" on a host call or "running")."""
        pending = self._session.outstanding
        return self._session.tokens, "waiting" if pending is not None and not pending.done else "running"

    def stop(self, reason: str = "its client stopped it") -> None:
        if not self.done:
            self.stop_reason = reason
            self._host.scheduler.kill(self._task, reason)

    def wait(self, timeout: float | None = None) -> Outcome:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"inferlet {self.instance_id} still running after {timeout} s")
        return self.outcome


class InferletHost:
    """Launches inferlets on one executor. `program` is a .py source (built on demand), a .wasm, or a
    component already compiled by this host's sandbox."""

    def __init__(self, executor: Executor | None = None, limits: Limits = Limits(), policy: BatchPolicy = BatchPolicy(),
                 http_policy: HttpPolicy = HttpPolicy(), bus_limits: BusLimits | None = None,
                 sandbox: Sandbox | None = None, worker: LocalWorker | RemoteWorker | None = None,
                 bus: MessageBus | RemoteBus | None = None):
        """Runs inferlets on `executor` (a LocalWorker of its own, batching under `policy`), or on
        `worker`: a LocalWorker shared with other hosts, or a RemoteWorker in another process.
        `bus`: the message bus its inferlets share with others (default: one of its own)."""
        if (executor is None) == (worker is None):
            raise ValueError("an InferletHost runs on an executor or on a worker: give exactly one")
        self.limits = limits
        self.sandbox = sandbox or Sandbox()
        timers = Timers()
        self.worker = worker or LocalWorker(executor, policy)
        self._owns_worker = worker is None
        self.services = HostServices(
            worker=self.worker,
            bus=bus if bus is not None else MessageBus(bus_limits or BusLimits(max_message_bytes=limits.max_message_bytes), timers),
            http=HttpClient(http_policy), timers=timers)
        self.scheduler = Scheduler(self.sandbox, timers, hold=self.worker.hold, flush=self.worker.flush)
        # instance ids are unique across hosts: a worker serves many, and pages belong to instances
        self.host_id = secrets.token_hex(4)
        self._ids = itertools.count(1)

    @property
    def executor(self) -> Executor:
        """The executor of a local worker (a remote worker's is in its own process)."""
        if not isinstance(self.worker, LocalWorker):
            raise AttributeError(f"this host runs on the remote worker at {self.worker.target}")
        return self.worker.executor

    def component(self, program: str | Path | wc.Component) -> wc.Component:
        return load_component(self.sandbox, program)

    def launch(self, program: str | Path | wc.Component, arguments: list[str] = (), limits: Limits | None = None,
               on_message: Callable[[str], None] | None = None,
               on_end: Callable[[Outcome], None] | None = None, instance_id: str | None = None,
               cache_scope: str = "", keep_messages: bool = True) -> RunningInferlet:
        """Start an inferlet; `instance_id` names it (default: a fresh `inferlet-<host>-<n>`).
        `cache_scope` (program and tenant) decides whose prefix-cache pages it may reuse.
        on_message(message) may answer a Pending: the inferlet's send waits for it (backpressure).
        keep_messages=False: its messages go to on_message only, not into its Outcome too."""
        component = self.component(program)
        limits = limits or self.limits
        instance_id = instance_id or f"inferlet-{self.host_id}-{next(self._ids)}"
        outcome = Outcome(instance_id)
        finished = threading.Event()

        def deliver(message: str):
            if keep_messages:
                outcome.messages.append(message)
            return on_message(message) if on_message else None

        def ended(error: str | None) -> None:
            outcome.error = error
            finished.set()
            if on_end:
                on_end(outcome)

        session = InferletSession(instance_id, list(arguments), self.services, limits, deliver, cache_scope)
        task = Task(session, component, limits, ended)
        self.scheduler.start(task)
        return RunningInferlet(instance_id, self, session, task, outcome, finished)

    def run(self, program: str | Path | wc.Component, arguments: list[str] = (), **kwargs) -> Outcome:
        return self.launch(program, arguments, **kwargs).wait()

    def close(self) -> None:
        """Stop every inferlet, then the threads."""
        self.scheduler.close()
        self.services.close(close_worker=self._owns_worker)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
