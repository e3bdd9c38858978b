"""Moving a running inferlet's pages to another worker, between its steps.

An inferlet runs on its host's scheduler for the worker it was placed on (cluster_host.py); its
handler calls go through that worker's ClusterWorker. A move (`move_inferlet`) leaves it there and
sends its calls elsewhere from then on:

1. The gate closes: the inferlet's next calls wait. A forward pass or an import is queued (its
   Pending completes later: the host's other inferlets keep running); a page call (allocate, free,
   copy, mask, export, the prefix cache) waits on the calling thread, at most as long as the copy:
   that is the host's scheduler, so its other inferlets wait too (page calls return values at once
   to the guest, so they cannot be queued like a pass).
2. The calls it already made finish: its passes in flight end their step on the old worker.
3. Its pages are copied ([page, references, writable] from `holding` on the old worker) into pages
   allocated for it on the new one, in chunks (page_copy.copy_pages, as an import's copy).
4. The directory re-points the inferlet (KvDirectory.move_owner) — refused while it has non-persistent
   exports (shared from where they are) or an import's copy in flight.
5. The old worker releases everything it held there, and its route is set: the new worker and a PageMap
   from the ids it knows to the new pages (a copied page keeps its id, read-only stays read-only).
6. The gate opens: the queued calls go to the new worker, translated.

A failure before step 5 gives back the copy and leaves the inferlet where it was; it never notices
either way, except that its step took longer.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from cluster.actors.page_copy import copy_pages
from cluster.actors.page_map import PageMap
from cluster.errors import InferletNotMovable, InvalidDirectoryRequest
from cluster.pending import Pending
from cluster.rpc.remote_worker import RemoteWorker

if TYPE_CHECKING:
    from cluster.actors.cluster_worker import ClusterWorker

log = logging.getLogger("pie.cluster")

MAX_ENDED_ROUTES = 1024  # routes of ended inferlets kept for a late release
IDLE_WAIT_S = 60.0  # the longest a move waits for the inferlet's calls in flight to finish


@dataclass(frozen=True)
class MovedInferlet:
    instance_id: str
    src_worker: str
    dst_worker: str
    num_pages: int
    seconds: float  # from the gate closing to it opening: how long the inferlet's calls waited


class Route:
    """Where a moved inferlet's calls go: its worker now, and how its page ids map there."""

    def __init__(self, remote: RemoteWorker, worker_id: str, pages: PageMap):
        self.remote, self.worker_id = remote, worker_id
        self._pages = pages
        self._lock = threading.Lock()  # the inferlet's calls come from its scheduler and from copy threads

    def physical(self, pages) -> list[int]:
        with self._lock:
            return self._pages.physical(pages)

    def virtual(self, pages) -> list[int]:
        with self._lock:
            return self._pages.virtual(pages)

    def writable(self, pages) -> list[int]:
        """The worker's ids of pages the inferlet may write."""
        with self._lock:
            self._pages.require_writable(pages)
            return self._pages.physical(pages)

    def free(self, holder: str, pages: list[int]) -> None:
        with self._lock:  # held across the call: two frees of one page must not both pass to_free
            physical = self._pages.to_free(pages)
            if physical:
                self.remote.free(holder, physical)
            self._pages.freed(pages)

    def carried(self, physical: int, references: int, writable: bool) -> tuple[int, int, bool]:
        with self._lock:
            return self._pages.carried(physical, references, writable)


class Routes:
    """One ClusterWorker's moved inferlets (their routes), its moves in progress (their gates), and
    the calls each inferlet has in flight (what a move waits for)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._routes: dict[str, Route] = {}
        self._gates: dict[str, Pending] = {}  # holder -> completes when its move is over
        self._busy: collections.Counter[str] = collections.Counter()
        self._ended: collections.OrderedDict[str, Route] = collections.OrderedDict()

    @contextmanager
    def calling(self, holder: str) -> Iterator[Route | None]:
        """A page call: waits out a move in progress; its route (None: this worker, ids as they are)."""
        route = self._enter(holder, wait=True)[1]
        try:
            yield route
        finally:
            self._leave(holder)

    def later(self, holder: str) -> tuple[Pending | None, Route | None]:
        """An async call: (the gate of a move in progress, None) to queue it behind; or (None, its route)
        with the call counted in flight until `leave` (when its Pending is done)."""
        return self._enter(holder, wait=False)

    def leave(self, holder: str) -> None:
        self._leave(holder)

    def pop(self, holder: str) -> Route | None:
        """The inferlet ended: its route (after any move of it), kept a while for a late release (an
        import that completes after the inferlet ended gives its pages back where they were made)."""
        with self._cond:
            while holder in self._gates:
                self._cond.wait()
            route = self._routes.pop(holder, None) or self._ended.get(holder)
            if route is not None:
                self._ended[holder] = route
                while len(self._ended) > MAX_ENDED_ROUTES:
                    self._ended.popitem(last=False)
            return route

    def _enter(self, holder: str, wait: bool) -> tuple[Pending | None, Route | None]:
        with self._cond:
            gate = self._gates.get(holder)
            while gate is not None and wait:
                self._cond.wait()
                gate = self._gates.get(holder)
            if gate is not None:
                return gate, None
            self._busy[holder] += 1
            return None, self._routes.get(holder)

    def _leave(self, holder: str) -> None:
        with self._cond:
            self._busy[holder] -= 1
            if not self._busy[holder]:
                del self._busy[holder]
                self._cond.notify_all()

    # -- for the mover ----------------------------------------------------------------------------
    def close(self, holder: str, timeout_s: float) -> Pending:
        """Close the holder's gate and wait until its calls in flight are done; the gate, to `open`."""
        with self._cond:
            if holder in self._gates:
                raise InferletNotMovable(f"inferlet {holder!r} is already moving; wait for that move to end")
            gate = self._gates[holder] = Pending()
            if not self._cond.wait_for(lambda: not self._busy[holder], timeout_s):
                busy = self._busy[holder]
                self._open(holder, gate)
                raise InferletNotMovable(f"inferlet {holder!r} still had {busy} calls in flight after "
                                         f"{timeout_s:.0f} s (a long import's copy?); try again later")
            return gate

    def route(self, holder: str) -> Route | None:
        with self._cond:
            return self._routes.get(holder)

    def open(self, holder: str, gate: Pending, route: Route | None = None) -> None:
        """End the move: set the new route (if it committed), then run what waited for it."""
        with self._cond:
            if route is not None:
                self._routes[holder] = route
            self._open(holder, gate)
        gate.complete(None)  # the queued passes and imports go out, on this thread

    def _open(self, holder: str, gate: Pending) -> None:
        if self._gates.get(holder) is gate:
            del self._gates[holder]
        self._cond.notify_all()


def move_inferlet(worker: ClusterWorker, holder: str, to_worker: str,
                  idle_wait_s: float = IDLE_WAIT_S) -> MovedInferlet:
    """Move running inferlet `holder` (its calls go through `worker`) to worker `to_worker`, between
    its steps. Raises the directory's refusal or what failed; the inferlet then stays where it was."""
    started = time.perf_counter()
    gate = worker.routes.close(holder, idle_wait_s)
    new_route = None
    try:
        route = worker.routes.route(holder)
        src_id, source = (route.worker_id, route.remote) if route else (worker.worker_id, worker.remote)
        if to_worker == src_id:
            raise InvalidDirectoryRequest(f"inferlet {holder!r} is already on worker {to_worker!r}; nothing to move")
        worker.directory.owner(holder)  # raises UnknownOwner once it ended
        held, exports = source.holding(holder)
        if exports:
            raise InferletNotMovable(f"inferlet {holder!r} exports {exports[0]!r} (not persistent): those pages "
                                     f"are shared from worker {src_id!r} and cannot move with it; move it "
                                     f"after it unexports them")
        dest = worker.connect(to_worker)
        dst_pages = dest.allocate(holder, len(held), len(held)) if held else []
        try:
            copy_pages(source, holder, [p for p, _, _ in held], dest, holder, dst_pages)
            worker.directory.move_owner(holder, to_worker)
        except BaseException:
            _give_back(dest, holder, dst_pages, to_worker)
            raise
        pages = PageMap()
        for (physical, references, writable), copy in zip(held, dst_pages):
            if route is not None:
                virtual, references, writable = route.carried(physical, references, writable)
            else:
                virtual = physical
            pages.bind_copy(virtual, copy, references, writable)
        new_route = Route(dest, to_worker, pages)
        try:  # before the gate opens: a next move of it back to that worker must not lose its new pages
            source.release(holder)
        except Exception as e:  # the old worker is gone, and what the inferlet held there with it
            log.warning("%s: worker %s could not release its old pages: %r", holder, src_id, e)
    finally:
        worker.routes.open(holder, gate, new_route)
    seconds = time.perf_counter() - started
    log.info("moved inferlet %s (%d pages) from worker %s to worker %s in %.0f ms", holder, len(held), src_id,
             to_worker, seconds * 1e3)
    return MovedInferlet(holder, src_id, to_worker, len(held), seconds)


def _give_back(dest: RemoteWorker, holder: str, pages: list[int], worker_id: str) -> None:
    if not pages:
        return
    try:
        dest.free(holder, pages)
    except Exception as e:  # the worker is gone, and the copy with it
        log.warning("%s: worker %s could not free the move's copy: %r", holder, worker_id, e)
