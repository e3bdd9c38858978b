"""An inferlet host in cluster mode: inferlets placed by the directory, on workers in other processes.

ClusterHost launches like an InferletHost (same `sandbox`, same `launch` callbacks) but first
asks the directory where the inferlet goes (`place_owner`: the worker holding the longest cached
prefix of its prompt hint, else the least loaded) and records it there; the inferlet's end is
recorded too. Inside, one InferletHost per worker runs the inferlets placed on it (its scheduler
thread, its ClusterWorker); they share this host's sandbox, its one connection per worker and one
message bus: the cluster's (a RemoteBus, see cluster/rpc/bus_service.py), or else one of this host's own.

It is also where an operator moves exports between workers (`move_export`, see
cluster/actors/kv_migration.py) and this host's running inferlets (`move_inferlet`, see
cluster/actors/inferlet_move.py), or empties a worker of both (`drain_worker`), over the same connections.

A lost connection marks its worker dead in the directory (unless it already rejoined elsewhere):
the inferlets on it fail with WorkerUnavailable naming it, and the next launch placed on it (once
Ray restarted it and it joined again) dials its new address.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
from pathlib import Path
from typing import Callable

from wasmtime import component as wc

from cluster.rpc.bus_service import RemoteBus
from cluster.actors import inferlet_move, kv_migration
from cluster.actors.cluster_worker import ClusterWorker
from cluster.errors import InferletError, UnknownOwner
from cluster.services.http_client import HttpPolicy
from cluster.runtime.inferlet_host import InferletHost, Outcome, RunningInferlet, load_component
from cluster.services.messaging import BusLimits, MessageBus
from cluster.rpc.remote_worker import RemoteWorker
from cluster.runtime.sandbox import Limits, Sandbox
from cluster.services.timers import Timers
from workers.tokenizer import Tokenizer, TokenizerSpec

log = logging.getLogger("pie.cluster")

MAX_HINT_TOKENS = 8192  # a prompt hint longer than this is cut: placement only needs its start


class ClusterHost:
    def __init__(self, directory, limits: Limits = Limits(), http_policy: HttpPolicy = HttpPolicy(),
                 bus_limits: BusLimits | None = None, sandbox: Sandbox | None = None, host_id: str | None = None,
                 bus: RemoteBus | None = None, internal_token: str | None = None):
        """`directory`: a Directory in process or a DirectoryHandle to the actor. `bus`: the cluster's
        message bus (default: one of this host's own, shared by its inferlets on every worker).
        `internal_token`: what the workers require (default: the directory's)."""
        self.directory = directory
        self.internal_token = internal_token or directory.internal_token()
        self.limits = limits
        self.sandbox = sandbox or Sandbox()
        self.host_id = host_id or secrets.token_hex(4)
        self._http_policy = http_policy
        self._bus_timers = Timers() if bus is None else None
        self.bus = bus if bus is not None else MessageBus(
            bus_limits or BusLimits(max_message_bytes=limits.max_message_bytes), self._bus_timers)
        self._lock = threading.Lock()
        self._connections: dict[str, RemoteWorker] = {}  # worker id -> live connection
        self._hosts: dict[str, InferletHost] = {}  # worker id -> the host of the inferlets placed there
        self._tokenizer: Tokenizer | None = None
        self._ids = itertools.count(1)
        self._running: dict[str, RunningInferlet] = {}  # by instance id (its `host`: the scheduler it runs on)
        self._retired: list[InferletHost] = []  # hosts of a lost connection, while inferlets moved off run on

    # -- launching -------------------------------------------------------------------------------
    def component(self, program: str | Path | wc.Component) -> wc.Component:
        return load_component(self.sandbox, program)

    def launch(self, program: str | Path | wc.Component, arguments: list[str] = (), limits: Limits | None = None,
               on_message: Callable[[str], None] | None = None, on_end: Callable[[Outcome], None] | None = None,
               prompt_hint: str = "", worker_id: str | None = None, cache_scope: str = "",
               keep_messages: bool = True) -> RunningInferlet:
        """Place and start an inferlet. `prompt_hint`: text its context will start with, for
        prefix-affinity placement (optional); `worker_id` places it there instead."""
        component = self.component(program)
        with self._lock:
            instance_id = f"inferlet-{self.host_id}-{next(self._ids)}"
        if worker_id is None:
            owner = self.directory.place_owner(instance_id, self.host_id, self._hint_tokens(prompt_hint))
        else:
            owner = self.directory.add_owner(instance_id, self.host_id, worker_id)

        def ended(outcome: Outcome) -> None:
            self._forget(instance_id)
            if on_end:
                on_end(outcome)

        try:
            host = self.host_for(owner.worker_id)
            running = host.launch(component, arguments, limits, on_message, ended, instance_id=instance_id,
                                  cache_scope=cache_scope, keep_messages=keep_messages)
            with self._lock:
                if not running.done:  # else its end (_forget) came first
                    self._running[instance_id] = running
            return running
        except BaseException:
            self._forget(instance_id)
            raise

    def _forget(self, instance_id: str) -> None:
        """The inferlet ended: the directory drops it (and what it owned there)."""
        with self._lock:
            self._running.pop(instance_id, None)
        try:
            self.directory.owner_ended(instance_id)
        except Exception as e:  # already dropped (its worker died, or its launch failed): nothing to record
            log.debug("%s: owner_ended: %r", instance_id, e)

    def run(self, program, arguments: list[str] = (), **kwargs) -> Outcome:
        return self.launch(program, arguments, **kwargs).wait()

    def _hint_tokens(self, prompt_hint: str) -> list[int]:
        if not prompt_hint:
            return []
        if self._tokenizer is None:
            model = self.directory.model()
            self._tokenizer = Tokenizer(TokenizerSpec.from_json(model["tokenizer_meta"], model["tokenizer_json"]))
        return self._tokenizer.encode(prompt_hint[:MAX_HINT_TOKENS * 16])[:MAX_HINT_TOKENS]

    # -- workers ---------------------------------------------------------------------------------
    def host_for(self, worker_id: str) -> InferletHost:
        """The InferletHost of the inferlets on `worker_id`, over a live connection to it."""
        with self._lock:
            host = self._hosts.get(worker_id)
            if host is not None and not host.worker.remote.broken:
                return host
            broken = self._hosts.pop(worker_id, None)  # one caller retires it
        if broken is not None:
            self._retire(broken)
        worker = ClusterWorker(worker_id, self.connection(worker_id), self.directory, self.connection,
                               self.limits.max_pages)
        fresh = InferletHost(limits=self.limits, http_policy=self._http_policy, sandbox=self.sandbox, worker=worker,
                             bus=self.bus)
        with self._lock:
            self._hosts[worker_id] = fresh
        return fresh

    def _retire(self, host: InferletHost) -> None:
        """A host whose worker connection broke: its inferlets on that worker end (those a call of which
        failed already have); one moved to another worker runs on (on this host's scheduler). Closed,
        like those retired before, once nothing runs there."""
        lost = host.worker.worker_id
        with self._lock:
            stranded = [r for r in self._running.values() if r.host is host]
            retired, self._retired = self._retired + [host], []
        for running in stranded:
            if host.worker.where(running.instance_id) == lost:
                running.stop(f"its worker {lost} was lost: {host.worker.remote.broken}")
        for old in retired:
            if old.scheduler.num_running:
                with self._lock:
                    self._retired.append(old)
            else:
                old.close()

    def connection(self, worker_id: str) -> RemoteWorker:
        """This host's one connection to a worker (dialled anew after it broke)."""
        with self._lock:
            remote = self._connections.get(worker_id)
            if remote is not None and not remote.broken:
                return remote
        target = self.directory.target(worker_id)
        remote = RemoteWorker(target, on_broken=lambda reason: self._lost(worker_id, target, reason),
                              token=self.internal_token, name=worker_id)
        with self._lock:
            self._connections[worker_id] = remote
        return remote

    def _lost(self, worker_id: str, target: str, reason: str) -> None:
        log.warning("lost worker %s at %s: %s", worker_id, target, reason)
        try:
            self.directory.worker_lost(worker_id, target)
        except Exception as e:  # the directory itself is gone or never knew it: nothing to record
            log.warning("could not report worker %s lost: %r", worker_id, e)

    # -- moving exports between workers ----------------------------------------------------------
    def move_export(self, name: str, to_worker: str) -> kv_migration.Moved:
        """Move the persistent export `name` to worker `to_worker`; imports stay correct meanwhile.
        Raises the directory's refusal (ExportNotMovable, UnknownExport, WorkerDead, ...) or what failed."""
        return kv_migration.move_export(self.directory, self.connection, name, to_worker)

    def drain_worker(self, worker_id: str) -> kv_migration.Drained:
        """Move this host's running inferlets off `worker_id` (before removing it), then every export,
        each to the live worker with the most free pages; the answer lists what moved and what could
        not, with why. Other hosts' inferlets stay: drain it on each host (HostService.drain_worker)."""
        inferlets = self.move_inferlets_off(worker_id)
        drained = kv_migration.drain_worker(self.directory, self.connection, worker_id)
        return dataclasses.replace(drained, inferlets=inferlets)

    # -- moving running inferlets between workers ------------------------------------------------
    def move_inferlet(self, instance_id: str, to_worker: str) -> inferlet_move.MovedInferlet:
        """Move running inferlet `instance_id` of this host to worker `to_worker`, between its steps: its
        pages are copied there, and its passes and page calls go there from then on (see
        cluster/actors/inferlet_move.py). Raises the refusal (InferletNotMovable, UnknownWorker, ...) or
        what failed; it then runs on where it was."""
        return self._host_of(instance_id).worker.move(instance_id, to_worker)

    def where(self, instance_id: str) -> str:
        """The worker a running inferlet of this host has its pages on now."""
        return self._host_of(instance_id).worker.where(instance_id)

    def _host_of(self, instance_id: str) -> InferletHost:
        with self._lock:
            running = self._running.get(instance_id)
        if running is None:
            raise UnknownOwner(f"no running inferlet {instance_id!r} on host {self.host_id}; it ended, or "
                               f"runs on another host")
        return running.host

    def move_inferlets_off(self, worker_id: str) -> tuple[inferlet_move.MovedInferlet | kv_migration.NotMoved, ...]:
        """Move each of this host's running inferlets on `worker_id` to the live worker with the most free
        pages; an inferlet that cannot move (or ended meanwhile) is listed with why."""
        with self._lock:
            candidates = list(self._running)
        targets = kv_migration.DrainTargets(self.directory, worker_id)
        results = []
        for instance_id in candidates:
            try:
                if self.where(instance_id) != worker_id:
                    continue
                if not targets:
                    results.append(kv_migration.NotMoved(instance_id, f"no other live worker than {worker_id!r}"))
                    continue
                moved = self.move_inferlet(instance_id, targets.pick())
                targets.took(moved.dst_worker, moved.num_pages)
                results.append(moved)
            except InferletError as e:
                results.append(kv_migration.NotMoved(instance_id, str(e)))
        return tuple(results)

    # -- ending ----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()) + self._retired, {}
            self._retired = []
            connections, self._connections = list(self._connections.values()), {}
        for host in hosts:
            host.close()
        for remote in connections:
            remote.close()
        if self._bus_timers is not None:
            self._bus_timers.close()
        else:
            self.bus.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
