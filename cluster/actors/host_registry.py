"""What the cluster's gateways share, so that any of them answers any call: the live inferlet hosts
(where they serve, how loaded), the table of inferlets (instance -> host, program, owner token),
and the uploaded programs (content-addressed bytes).

This is the logic only: a thread-safe class, no Ray. The directory actor carries it beside the
KV directory (cluster/actors/directory_actor.py), so a gateway replica keeps no state of its own:
a second replica answers Send, Terminate, List and Attach for the first one's inferlets, and
launches programs the first one was sent.

- Hosts report every HOST_REPORT_S (`host_alive`); one not heard from for HOST_STALE_S gets no new
  inferlets, and after HOST_DEAD_S it is dropped with its inferlets (the gateway reports a host it
  finds dead at once: `drop_host`).
- `pick_host` answers the live, not draining host with the fewest inferlets (running plus the launches
  picked for it and not yet started), and counts the pick, so concurrent launches through several
  gateways spread. A pick is settled when its host records the inferlet (`instance_started`) or its
  gateway gives it back (`unpick_host`), and forgotten after PICK_TTL_S.
- Owner tokens are kept as sha256 digests: the directory can check one, not give one away.
- An ended inferlet stays in the table (marked ended) for ENDED_KEPT_S, so a late Send says "ended"
  and an Attach still reaches the host that holds its last events.
- Programs are held whole, at most MAX_PROGRAM_BYTES in all; the least recently used go first.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass, field, replace

from cluster.errors import HostBusy, InvalidDirectoryRequest, NoLiveHost, ProgramTooLarge, UnknownInferlet, UnknownProgram

HOST_REPORT_S = 1.0  # how often a host reports
HOST_STALE_S = 5.0  # a host silent this long gets no new inferlets
HOST_DEAD_S = 30.0  # ... and this long is dropped with its inferlets
PICK_TTL_S = 30.0  # a pick never settled is forgotten
ENDED_KEPT_S = 120.0  # an ended inferlet's record stays this long
ENDED_KEPT = 4096  # ... and at most this many
MAX_PROGRAM_BYTES = 1 << 30  # programs held for every gateway (components of ~20 MB: about 50)
MAX_ID_BYTES = 256  # host and instance ids, targets


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class HostLoad:
    host_id: str
    target: str  # its client API, host:port
    actor_name: str  # its Ray actor's name ("" when not an actor)
    max_running: int
    running: int  # inferlets in the table on it
    picked: int  # launches picked for it, not yet started
    draining: bool  # gets no new inferlets (the pool is removing it)
    silent_s: float  # since its last report


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    host_id: str
    target: str  # its host's client API
    program_id: str
    started: float  # time.time()
    token_digest: str  # sha256 of its owner token
    ended: bool = False


@dataclass
class _Host:
    target: str
    actor_name: str
    max_running: int
    seen: float  # time.monotonic() of its last report
    draining: bool = False
    picks: collections.deque = field(default_factory=collections.deque)  # time.monotonic() of open picks


class HostRegistry:
    def __init__(self):
        self._hosts_lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._instances: dict[str, InstanceRecord] = {}  # running ones
        self._running: collections.Counter[str] = collections.Counter()  # host id -> its running ones
        self._ended: collections.OrderedDict[str, tuple[InstanceRecord | None, float]] = collections.OrderedDict()
        self._programs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._program_bytes = 0

    # -- hosts -------------------------------------------------------------------------------------
    def host_alive(self, host_id: str, target: str, max_running: int, actor_name: str = "") -> bool:
        """A host's report. False when the host was not known (new, or the directory restarted): it
        then records its running inferlets again (`instances_restore`)."""
        _check_ids(host_id, target, actor_name)
        if max_running < 1:
            raise InvalidDirectoryRequest(f"host {host_id!r} reports max_running {max_running}; it must be at least 1")
        with self._hosts_lock:
            host = self._hosts.get(host_id)
            if host is None:
                self._hosts[host_id] = _Host(target, actor_name, max_running, time.monotonic())
                return False
            host.target, host.max_running, host.seen = target, max_running, time.monotonic()
            return True

    def hosts(self) -> list[HostLoad]:
        with self._hosts_lock:
            dead = self._reap()
            loads = self._loads()
        self._hosts_dropped(dead)
        return loads

    def pick_host(self, exclude: tuple[str, ...] = ()) -> HostLoad:
        """The least loaded host that can take one more inferlet (counted as picked for it). HostBusy when
        every host is full, NoLiveHost when none takes inferlets at all."""
        with self._hosts_lock:
            dead = self._reap()
            loads = [h for h in self._loads() if h.host_id not in exclude]
            usable = [h for h in loads if not h.draining and h.silent_s < HOST_STALE_S]
            free = [h for h in usable if h.running + h.picked < h.max_running]
            if free:
                best = min(free, key=lambda h: (h.running + h.picked, h.host_id))
                self._hosts[best.host_id].picks.append(time.monotonic())
        self._hosts_dropped(dead)
        if not free:
            raise (HostBusy if usable else NoLiveHost)(_no_host_why(loads, usable, exclude))
        return replace(best, picked=best.picked + 1)

    def unpick_host(self, host_id: str) -> None:
        """A launch picked for the host did not start there."""
        with self._hosts_lock:
            host = self._hosts.get(host_id)
            if host is not None and host.picks:
                host.picks.popleft()

    def set_host_draining(self, host_id: str, draining: bool = True) -> HostLoad:
        with self._hosts_lock:
            host = self._hosts.get(host_id)
            if host is None:
                raise InvalidDirectoryRequest(f"no inferlet host {host_id!r} is registered")
            host.draining = draining
            return next(h for h in self._loads() if h.host_id == host_id)

    def drop_host(self, host_id: str) -> list[str]:
        """The host is gone (dead, or removed by the pool): it and its inferlets leave the tables. The
        ids of the inferlets that were running on it."""
        with self._hosts_lock:
            return self._drop_host(host_id)

    def _hosts_dropped(self, host_ids: list[str]) -> None:
        """Hosts found dead (silent for HOST_DEAD_S) were dropped: the directory ends what they owned."""

    # -- the instance table ------------------------------------------------------------------------
    def instance_started(self, instance_id: str, host_id: str, program_id: str, token_digest_: str) -> None:
        _check_ids(instance_id, program_id, token_digest_)
        with self._hosts_lock:
            host = self._hosts.get(host_id)
            if host is None:
                raise InvalidDirectoryRequest(f"inferlet {instance_id!r} started on host {host_id!r}, which is not "
                                              f"registered (or was dropped as dead)")
            if host.picks:
                host.picks.popleft()
            if instance_id in self._ended:  # it ended before its start was recorded
                return
            self._record(InstanceRecord(instance_id, host_id, host.target, program_id, time.time(), token_digest_))

    def instances_restore(self, host_id: str, records: list[tuple[str, str, str, float]]) -> None:
        """A host's running inferlets again, (instance id, program id, token digest, started), after the
        directory forgot them (it restarted)."""
        with self._hosts_lock:
            host = self._hosts.get(host_id)
            if host is None:
                raise InvalidDirectoryRequest(f"host {host_id!r} restores inferlets before it reported")
            for instance_id, program_id, digest, started in records:
                _check_ids(instance_id, program_id, digest)
                if instance_id not in self._ended:
                    self._record(InstanceRecord(instance_id, host_id, host.target, program_id, started, digest))

    def instance_ended(self, instance_id: str) -> None:
        with self._hosts_lock:
            self._end(instance_id)

    def instance(self, instance_id: str) -> InstanceRecord:
        """The running (or recently ended: `ended`) inferlet; UnknownInferlet when neither."""
        with self._hosts_lock:
            record = self._instances.get(instance_id)
            if record is None and instance_id in self._ended:
                record = self._ended[instance_id][0]
            if record is None:
                raise UnknownInferlet(f"no inferlet {instance_id!r} runs in this cluster; use the instance id of a "
                                      f"Launch's `started` event")
            return record

    def instances(self) -> list[InstanceRecord]:
        with self._hosts_lock:
            return sorted(self._instances.values(), key=lambda r: r.started)

    # -- programs ------------------------------------------------------------------------------------
    def put_program(self, program_id: str, data: bytes) -> None:
        """Hold a program's bytes (the gateway that stored it checked them and their digest)."""
        if hashlib.sha256(data).hexdigest() != program_id:
            raise InvalidDirectoryRequest(f"the bytes given for program {program_id[:64]!r} have another digest")
        if len(data) > MAX_PROGRAM_BYTES:
            raise ProgramTooLarge(f"a {len(data)}-byte program is over what the directory holds "
                                  f"({MAX_PROGRAM_BYTES} bytes in all)")
        with self._hosts_lock:
            if program_id in self._programs:
                self._programs.move_to_end(program_id)
                return
            self._programs[program_id] = data
            self._program_bytes += len(data)
            while self._program_bytes > MAX_PROGRAM_BYTES:
                _, dropped = self._programs.popitem(last=False)
                self._program_bytes -= len(dropped)

    def program(self, program_id: str) -> bytes:
        with self._hosts_lock:
            data = self._programs.get(program_id)
            if data is None:
                raise UnknownProgram(f"no program {program_id[:64]!r} in this cluster; upload it first (its id is "
                                     f"the sha256 hex digest the upload returns)")
            self._programs.move_to_end(program_id)
            return data

    def has_program(self, program_id: str) -> bool:
        with self._hosts_lock:
            return program_id in self._programs

    # -- under the lock ----------------------------------------------------------------------------
    def _loads(self) -> list[HostLoad]:
        now = time.monotonic()
        running = self._running
        loads = []
        for host_id, h in sorted(self._hosts.items()):
            while h.picks and now - h.picks[0] > PICK_TTL_S:
                h.picks.popleft()
            loads.append(HostLoad(host_id, h.target, h.actor_name, h.max_running, running[host_id], len(h.picks),
                                  h.draining, now - h.seen))
        return loads

    def _reap(self) -> list[str]:
        now = time.monotonic()
        dead = [i for i, h in self._hosts.items() if now - h.seen > HOST_DEAD_S]
        for host_id in dead:
            self._drop_host(host_id)
        while self._ended and now - next(iter(self._ended.values()))[1] > ENDED_KEPT_S:
            self._ended.popitem(last=False)
        return dead

    def _record(self, record: InstanceRecord) -> None:
        old = self._instances.get(record.instance_id)
        if old is not None:  # recorded again (a restore): counted once, on its host now
            self._uncount(old.host_id)
        self._instances[record.instance_id] = record
        self._running[record.host_id] += 1

    def _uncount(self, host_id: str) -> None:
        self._running[host_id] -= 1
        if self._running[host_id] <= 0:
            del self._running[host_id]

    def _drop_host(self, host_id: str) -> list[str]:
        self._hosts.pop(host_id, None)
        gone = [i for i, r in self._instances.items() if r.host_id == host_id]  # rare: a scan is fine
        for instance_id in gone:
            self._end(instance_id)
        return gone

    def _end(self, instance_id: str) -> None:
        record = self._instances.pop(instance_id, None)
        if record is not None:
            self._uncount(record.host_id)
        self._ended[instance_id] = (replace(record, ended=True) if record else None, time.monotonic())
        self._ended.move_to_end(instance_id)
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)


def _check_ids(*values: str) -> None:
    for value in values:
        if not isinstance(value, str) or len(value.encode()) > MAX_ID_BYTES:
            raise InvalidDirectoryRequest(f"an id or address of {len(str(value))} characters: at most {MAX_ID_BYTES} "
                                          f"bytes")


def _no_host_why(loads: list[HostLoad], usable: list[HostLoad], exclude: tuple[str, ...]) -> str:
    if not loads:
        return ("no inferlet host is up" + (f" besides {', '.join(exclude)}" if exclude else "")
                + "; the cluster is starting or its hosts are restarting: retry shortly")
    if not usable:
        return (f"none of the {len(loads)} inferlet hosts takes inferlets now (draining, or not heard from for "
                f"{HOST_STALE_S:.0f} s); retry shortly")
    running = sum(h.running + h.picked for h in usable)
    return (f"every inferlet host is full: {running} inferlets on {len(usable)} hosts of "
            f"{', '.join(str(h.max_running) for h in usable)} each; retry when some have ended")
