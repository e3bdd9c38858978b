"""Moving exports between workers: one export on request (to balance load), or every export off a
worker before it is removed (drain).

A move carries out the directory's two phases (KvDirectory.begin_move / finish_move) with the
workers' own page calls, the same ones an import's copy uses (page_copy.copy_pages):

1. `begin_move`: the directory records the move; the export stays readable on the source.
2. On the source, a holder for the move takes references to the export's pages (an import by name,
   as a copy's lease does), so an unexport meanwhile cannot free them under the copy.
3. On the destination, the same holder allocates as many pages, the contents are copied across in
   chunks, and the holder exports them (persistent) under the export's name: from then on the
   export's own reference keeps them, whoever later unexports it.
4. `finish_move`: the directory re-points the export at the destination in one step.
5. The move's holders release their references. The source ends its export of the old pages once
   every copy that started before the commit (it reads the source under its lease) has ended, and
   SETTLE_S has passed: an import that the directory sent to the source's pages in place just
   before the commit has its call on the way to the source worker then, and finds them there.

Any failure before the commit aborts the move and gives back what was made on the destination; the
export stays on the source as it was. A non-persistent export does not move here (the directory refuses
it): its pages are its running inferlet's own. A running inferlet moves with its host's help, between
its steps: cluster/actors/inferlet_move.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from cluster.actors.page_copy import copy_pages
from cluster.actors.directory_records import MoveDone, MovePlan
from cluster.errors import InferletError
from cluster.rpc.remote_worker import RemoteWorker

log = logging.getLogger("pie.cluster")

SETTLE_S = 1.0  # after the commit, before the source ends its export: see step 5 above
LEASE_WAIT_S = 120.0  # the longest the source's pages wait for copies that began before the commit
POLL_S = 0.05


@dataclass(frozen=True)
class Moved:
    name: str
    src_worker: str
    dst_worker: str
    num_pages: int


@dataclass(frozen=True)
class NotMoved:
    name: str
    reason: str  # the refusal or failure, in the error's own words


@dataclass(frozen=True)
class Drained:
    worker_id: str
    moved: tuple[Moved, ...]
    not_moved: tuple[NotMoved, ...]  # still on the worker
    inferlets: tuple = ()  # ClusterHost.drain_worker: its running inferlets' MovedInferlet, or NotMoved (by id)


@dataclass(frozen=True)
class _Committed:
    """A move the directory committed whose source has not let go of its pages yet."""

    plan: MovePlan
    done: MoveDone
    committed_at: float  # time.monotonic()


def move_export(directory, connect: Callable[[str], RemoteWorker], name: str, to_worker: str,
                settle_s: float = SETTLE_S) -> Moved:
    """Move export `name` to worker `to_worker`. `directory`: a Directory or DirectoryHandle; `connect`:
    a connection to a worker by id (ClusterHost.connection). Raises the directory's refusal, or what
    failed (the export then stays where it was)."""
    committed = _copy_and_commit(directory, connect, name, to_worker)
    _release_sources(directory, connect, [committed], settle_s)
    return Moved(name, committed.plan.src_worker, to_worker, len(committed.plan.src_pages))


class DrainTargets:
    """The live workers other than `worker_id` that a drain moves things to: the one with the most free
    pages first (counting what the drain already moved there), then the fewest running inferlets."""

    def __init__(self, directory, worker_id: str):
        self._others = {w.worker_id: w for w in directory.workers() if w.live and w.worker_id != worker_id}
        self._free = {w_id: w.free_pages for w_id, w in self._others.items()}

    def __bool__(self) -> bool:
        return bool(self._others)

    def pick(self) -> str:
        return max(self._free, key=lambda w_id: (self._free[w_id], -self._others[w_id].running, w_id))

    def took(self, worker_id: str, pages: int) -> None:
        self._free[worker_id] -= pages


def drain_worker(directory, connect: Callable[[str], RemoteWorker], worker_id: str,
                 settle_s: float = SETTLE_S) -> Drained:
    """Move every export off `worker_id`, each to the live worker with the most free pages (counting
    what this drain already moved there). What cannot move stays, with the reason: a non-persistent
    export (its inferlet still runs there), no other live worker, or the move's own failure."""
    exports = directory.exports_on(worker_id)
    targets = DrainTargets(directory, worker_id)
    committed, not_moved = [], []
    for info in exports:
        if not targets:
            not_moved.append(NotMoved(info.name, f"no other live worker to move it to than {worker_id!r}"))
            continue
        target = targets.pick()
        try:
            committed.append(_copy_and_commit(directory, connect, info.name, target))
        except InferletError as e:  # the directory's refusal, a worker's, or a lost worker
            not_moved.append(NotMoved(info.name, str(e)))
            continue
        targets.took(target, len(info.pages))
    _release_sources(directory, connect, committed, settle_s)  # one settle for the whole drain
    moved = tuple(Moved(c.plan.name, worker_id, c.plan.dst_worker, len(c.plan.src_pages)) for c in committed)
    return Drained(worker_id, moved, tuple(not_moved))


def _copy_and_commit(directory, connect: Callable[[str], RemoteWorker], name: str, to_worker: str) -> _Committed:
    """Steps 1-4: the export lives on `to_worker` when this returns; on failure, where it was."""
    plan = directory.begin_move(name, to_worker)
    holder = f"move-{plan.move_id}"  # on both workers
    source = dest = None
    exported = False
    try:
        source, dest = connect(plan.src_worker), connect(plan.dst_worker)
        src_pages, _ = source.import_(holder, name)
        dst_pages = dest.allocate(holder, len(src_pages), len(src_pages))
        copy_pages(source, holder, src_pages, dest, holder, dst_pages)
        dest.export(holder, name, dst_pages, plan.meta, True)
        exported = True
        done = directory.finish_move(plan.move_id, dst_pages)
    except BaseException:
        _undo(directory, plan, holder, source, dest, exported)
        raise
    dest.release(holder)  # the export's own reference keeps the copy
    source.release(holder)
    log.info("moved %r (%d pages) from worker %s to worker %s", name, len(dst_pages), plan.src_worker, to_worker)
    return _Committed(plan, done, time.monotonic())


def _undo(directory, plan: MovePlan, holder: str, source: RemoteWorker | None, dest: RemoteWorker | None,
          exported: bool) -> None:
    """A move failed before its commit: the directory forgets it, the destination gives back its copy."""
    try:
        directory.abort_move(plan.move_id)
    except Exception as e:  # the directory is gone: its move went with it
        log.warning("move %d of %r: abort_move failed: %r", plan.move_id, plan.name, e)
    if dest is not None:
        if exported:
            try:
                dest.unexport(holder, plan.name)
            except Exception as e:  # the worker is gone, and the copy with it
                log.warning("move %d of %r: unexport on worker %s failed: %r", plan.move_id, plan.name,
                            plan.dst_worker, e)
        dest.release(holder)
    if source is not None:
        source.release(holder)


def _release_sources(directory, connect: Callable[[str], RemoteWorker], committed: list[_Committed],
                     settle_s: float) -> None:
    """Step 5 for committed moves: wait for their copies begun before the commit, and the settle
    time, then each source ends its export of the old pages."""
    waiting = {lease for c in committed for lease in c.done.open_leases}
    deadline = time.monotonic() + LEASE_WAIT_S
    while waiting:
        waiting &= {plan.lease_id for plan in directory.copies_in_flight()}
        if not waiting:
            break
        if time.monotonic() > deadline:
            log.warning("copies %s from moved exports' old pages still run after %.0f s; ending those exports "
                        "anyway", sorted(waiting), LEASE_WAIT_S)
            break
        time.sleep(POLL_S)
    for c in committed:
        time.sleep(max(0.0, c.committed_at + settle_s - time.monotonic()))
        release = c.done.release
        try:
            connect(release.worker_id).unexport(f"move-{c.plan.move_id}", release.name)
        except Exception as e:  # the source died (its pages with it), or its export ended another way
            log.warning("move %d of %r: worker %s could not end its old export: %r", c.plan.move_id, release.name,
                        release.worker_id, e)
