"""The elastic inferlet host pool: a host added when the hosts are busy or full, removed when idle.

`HostPool` runs as the named actor POOL_NAME (restartable: it keeps nothing the directory does not
know) beside a cluster whose ClusterSpec has `max_hosts` above `hosts`. Every `tick_s` it reads the
directory's host table (`hosts()`) and acts on `plan()`, a pure function of that table, the time and
the PoolPolicy:

- grow, one host at a time and never beyond `max_hosts`: when the busy fraction (running plus picked
  over the summed max_running of the hosts taking inferlets) reaches `grow_at`, or when more gateways
  wait in `grow()` than there are free places. A host being drained is put back to work first; else a
  new host actor is started (the cluster's own `start_host`, so with the same options as the first
  ones) under a fresh name, and the pool waits until it reports in the directory.
- shrink: a host the pool may remove (index >= `min_hosts`: the `hosts` that start_cluster made stay)
  that has run nothing for `idle_s` is marked draining in the directory (no new inferlets), if the
  others keep the busy fraction below `grow_at` without it. Once the directory counts nothing on it,
  the pool asks the host itself, then the directory again, and only when both say empty stops it
  (`shutdown`), kills the actor and drops it from the directory. A draining host that got an inferlet
  (a launch picked for it before the drain) waits until that one has ended.

A gateway whose launch finds every host full calls `grow(timeout_s)` (through Cluster.gateway_service's
`wait_for_host`): True once a place is free for it (counted for GRANT_S, so concurrent callers do not
all take the same place), False when none will be (every host full at `max_hosts`) or on timeout.
Placement stays the directory's: the least loaded host, as with a fixed pool.

The hosts the pool adds are actors it created: Ray ends them with the pool actor's process (their
inferlets fail, the directory drops them) unless start_cluster's placement makes its actors detached.
The cluster's own hosts are the driver's, and a restarted pool carries on with what the directory shows.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, DirectoryHandle
from cluster.actors.host_registry import HOST_STALE_S, HostLoad

log = logging.getLogger("pie.pool")
POOL_NAME = "pie-host-pool"
GRANT_S = 1.0  # a place granted to a waiting launch counts as taken this long (its pick follows within ms)
START_TIMEOUT_S = 120.0  # a new host not reporting in the directory by then is killed (no node had room?)
SHUTDOWN_GRACE_S = 2.0  # what a removed host gives its (empty) server to stop
CALL_TIMEOUT_S = 30.0  # calls to a host actor being removed
FAIL_AFTER_S = 60.0  # the loop failing this long without one good tick: the actor exits and Ray restarts it


@dataclass(frozen=True)
class PoolPolicy:
    min_hosts: int = 1  # hosts 0..min_hosts-1 are the cluster's own, never removed
    max_hosts: int = 1  # never more hosts than this
    grow_at: float = 0.75  # busy fraction (running + picked over max_running) at which a host is added
    idle_s: float = 30.0  # a host running nothing this long is removed (drained first)
    tick_s: float = 0.5  # how often the pool reads the directory

    def __post_init__(self):
        if not (isinstance(self.min_hosts, int) and isinstance(self.max_hosts, int) and
                1 <= self.min_hosts <= self.max_hosts):
            raise ValueError(f"PoolPolicy needs 1 <= min_hosts <= max_hosts, not {self.min_hosts} and {self.max_hosts}")
        if not 0.0 < self.grow_at <= 1.0:
            raise ValueError(f"PoolPolicy.grow_at is a busy fraction in (0, 1], not {self.grow_at}")
        if self.idle_s <= 0 or self.tick_s <= 0:
            raise ValueError(f"PoolPolicy.idle_s and tick_s must be positive, not {self.idle_s} and {self.tick_s}")


@dataclass(frozen=True)
class PoolPlan:
    """What the pool does on one tick (at most one of start, undrain, drain; removals beside a drain)."""
    idle_since: Mapping[str, float]  # host id -> time.monotonic() since it runs nothing (hosts taking inferlets)
    start: bool = False  # start one more host
    undrain: str | None = None  # host id: a draining host put back to work instead of a new one
    drain: str | None = None  # host id: idle for idle_s, to be removed
    remove: tuple[str, ...] = ()  # host ids: draining, and the directory counts nothing on them
    why: str = ""  # for the log

    @property
    def acts(self) -> bool:
        return self.start or bool(self.undrain or self.drain or self.remove)


@dataclass(frozen=True)
class PoolStatus:
    hosts: tuple[str, ...]  # actor names of the hosts in the directory, the pool's and the cluster's own
    draining: tuple[str, ...]  # ... of those being removed
    started: int  # hosts this pool actor started (since it last restarted)
    removed: int  # ... and removed


def host_index(actor_name: str) -> int | None:
    """n of a host actor named pie-host-<n>; None for a host that is not an actor."""
    match = re.fullmatch(r".*?(\d+)", actor_name)
    return int(match.group(1)) if actor_name and match else None


def free_places(hosts: list[HostLoad]) -> int:
    """Inferlets the hosts taking inferlets could start now."""
    return sum(max(0, h.max_running - h.running - h.picked) for h in hosts if _serving(h))


def plan(hosts: list[HostLoad], now: float, idle_since: Mapping[str, float], policy: PoolPolicy,
         waiting: int = 0) -> PoolPlan:
    """What to do about the directory's `hosts` at `now` (time.monotonic()); `idle_since` is the last
    plan's, `waiting` the launches waiting in grow() for a place."""
    pool = [h for h in hosts if host_index(h.actor_name) is not None]
    serving = [h for h in pool if _serving(h)]
    draining = [h for h in pool if h.draining and host_index(h.actor_name) >= policy.min_hosts]  # the pool's own
    load = sum(h.running + h.picked for h in serving)
    capacity = sum(h.max_running for h in serving)
    free = free_places(serving)
    idle = {h.host_id: idle_since.get(h.host_id, now) for h in serving if h.running + h.picked == 0}
    busy = capacity > 0 and load / capacity >= policy.grow_at
    if busy or waiting > free:
        why = (f"{load} of {capacity} places busy (grow at {policy.grow_at:.0%})" if busy
               else f"{waiting} launches wait, {free} places free")
        if draining:  # already there: back to work
            back = max(draining, key=lambda h: (h.running + h.picked, h.host_id))
            return PoolPlan(idle, undrain=back.host_id, why=why)
        if len(pool) < policy.max_hosts:
            return PoolPlan(idle, start=True, why=f"{why}; {len(pool)} of at most {policy.max_hosts} hosts")
        return PoolPlan(idle, why=f"{why}; at max_hosts {policy.max_hosts}")
    remove = tuple(h.host_id for h in draining if h.running + h.picked == 0)
    removable = [h for h in serving if h.host_id in idle and now - idle[h.host_id] >= policy.idle_s
                 and host_index(h.actor_name) >= policy.min_hosts]
    for host in sorted(removable, key=lambda h: -host_index(h.actor_name)):  # the newest first
        rest = capacity - host.max_running
        if rest > 0 and load / rest < policy.grow_at:  # else it would be added back at once
            return PoolPlan(idle, drain=host.host_id, remove=remove,
                            why=f"idle for {now - idle[host.host_id]:.0f} s; {load} of {rest} places busy "
                                f"on the others")
    return PoolPlan(idle, remove=remove, why="draining hosts are empty" if remove else "")


def _serving(host: HostLoad) -> bool:
    return not host.draining and host.silent_s < HOST_STALE_S


class HostPool:
    """The pool's actor. `start_host(index)` starts (or finds) the host actor named `host_name.format(index)`
    and returns its handle (cluster.actors.cluster.start_host, bound to the ClusterSpec). `directory`: a
    Directory or DirectoryHandle (default: the directory actor DIRECTORY_NAME's)."""

    def __init__(self, policy: PoolPolicy, start_host: Callable[[int], Any], host_name: str = "pie-host-{}",
                 directory=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.policy = policy
        self._start_host, self._host_name = start_host, host_name
        if directory is None:
            import ray

            directory = DirectoryHandle(ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE))
        self._directory = directory
        self._cond = threading.Condition()
        self._waiting = 0  # grow() calls waiting for a place
        self._grants: collections.deque[float] = collections.deque()  # time.monotonic() of recent grants
        self._acting = False  # the loop is starting, undraining or removing a host
        self._idle_since: dict[str, float] = {}
        self._started = self._removed = 0
        self._used: set[int] = set()  # host indexes this actor started
        self._handles: dict[str, Any] = {}  # actor name -> handle of the hosts it started (Ray ends an actor
        # once no handle to it is left)
        self._stopped = threading.Event()
        log.info("host pool: %d to %d hosts, grow at %.0f%% busy, remove after %.0f s idle", policy.min_hosts,
                 policy.max_hosts, policy.grow_at * 100, policy.idle_s)
        threading.Thread(target=self._loop, name="host-pool", daemon=True).start()

    # -- what gateways call ----------------------------------------------------------------------------
    def grow(self, timeout_s: float = 60.0) -> bool:
        """A launch found every host full: True once a place is free for it (the pool added a host or put a
        draining one back, or an inferlet ended), False when every host is full at max_hosts, or after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # the loop plans now
        try:
            while True:
                hosts = self._directory.hosts()
                with self._cond:
                    now = time.monotonic()
                    while self._grants and now - self._grants[0] > GRANT_S:
                        self._grants.popleft()
                    free = free_places(hosts)
                    if free > len(self._grants):
                        self._grants.append(now)
                        return True
                    pool = [h for h in hosts if host_index(h.actor_name) is not None]
                    undrainable = any(h.draining and host_index(h.actor_name) >= self.policy.min_hosts for h in pool)
                    if free == 0 and len(pool) >= self.policy.max_hosts and not self._acting and not undrainable:
                        log.info("a launch waits for a place: every host is full at max_hosts %d",
                                 self.policy.max_hosts)
                        return False
                    if now >= deadline:
                        log.warning("a launch waited %.0f s for a place and got none", timeout_s)
                        return False
                    self._cond.wait(min(0.2, deadline - now))
        finally:
            with self._cond:
                self._waiting -= 1

    def status(self) -> PoolStatus:
        hosts = [h for h in self._directory.hosts() if host_index(h.actor_name) is not None]
        return PoolStatus(tuple(h.actor_name for h in hosts), tuple(h.actor_name for h in hosts if h.draining),
                          self._started, self._removed)

    def stop(self) -> None:
        """Stop acting (the hosts stay as they are)."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()

    # -- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        good = time.monotonic()
        while not self._stopped.is_set():
            try:
                self._tick()
                good = time.monotonic()
            except Exception:
                log.exception("host pool tick failed (the directory restarting?); next in %.1f s", self.policy.tick_s)
                if time.monotonic() - good > FAIL_AFTER_S:
                    log.critical("host pool failing for %.0f s: exiting, Ray restarts it", FAIL_AFTER_S)
                    os._exit(1)
            with self._cond:
                if not self._stopped.is_set():
                    self._cond.wait(self.policy.tick_s)  # grow() wakes it early

    def _tick(self) -> None:
        hosts = self._directory.hosts()
        with self._cond:
            waiting = self._waiting
        step = plan(hosts, time.monotonic(), self._idle_since, self.policy, waiting)
        self._idle_since = dict(step.idle_since)
        if not step.acts:
            return
        by_id = {h.host_id: h for h in hosts}
        with self._cond:
            self._acting = True
        try:
            if step.start:
                self._start(hosts, step.why)
            if step.undrain:
                self._directory.set_host_draining(step.undrain, False)
                log.info("%s back to work: %s", by_id[step.undrain].actor_name, step.why)
            for host_id in step.remove:
                self._remove(by_id[host_id])
            if step.drain:
                self._directory.set_host_draining(step.drain, True)
                log.info("draining %s: %s", by_id[step.drain].actor_name, step.why)
        finally:
            with self._cond:
                self._acting = False
                self._cond.notify_all()

    def _start(self, hosts: list[HostLoad], why: str) -> None:
        """Start a host under a fresh name and wait until it reports in the directory."""
        import ray

        known = {host_index(h.actor_name) for h in hosts} - {None}
        index = max(known | self._used | {self.policy.min_hosts - 1}) + 1
        name = self._host_name.format(index)
        self._used.add(index)
        log.info("starting %s: %s", name, why)
        t0 = time.monotonic()
        handle = self._handles[name] = self._start_host(index)
        while not any(h.actor_name == name for h in self._directory.hosts()):
            if time.monotonic() - t0 > START_TIMEOUT_S:
                log.warning("%s did not report within %.0f s (no node with room for it?): killing it", name,
                            START_TIMEOUT_S)
                ray.kill(handle, no_restart=True)
                del self._handles[name]
                return
            time.sleep(0.1)
        self._started += 1
        log.info("%s reports after %.1f s", name, time.monotonic() - t0)

    def _remove(self, host: HostLoad) -> None:
        """Stop, kill and drop a draining host if it is still empty; else leave it draining."""
        import ray

        try:
            handle = ray.get_actor(host.actor_name, namespace=NAMESPACE)
        except ValueError:
            handle = None  # gone already
        if handle is not None:
            try:
                running = ray.get(handle.running.remote(), timeout=CALL_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as e:
                running = 0
                log.warning("%s does not answer (%r): removing it", host.actor_name, e)
            again = next((h for h in self._directory.hosts() if h.host_id == host.host_id), None)
            if running or (again is not None and again.running + again.picked):
                log.info("%s is draining but busy again (%d running): removed once empty", host.actor_name,
                         running or again.running + again.picked)
                return
            try:
                ray.get(handle.shutdown.remote(SHUTDOWN_GRACE_S), timeout=CALL_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.warning("%s did not shut down (%r): killing it", host.actor_name, e)
            ray.kill(handle, no_restart=True)
        self._directory.drop_host(host.host_id)
        self._handles.pop(host.actor_name, None)
        self._idle_since.pop(host.host_id, None)
        self._removed += 1
        log.info("removed %s (host %s)", host.actor_name, host.host_id)
