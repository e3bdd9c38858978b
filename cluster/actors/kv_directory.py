"""The cluster's global KV-page directory: which worker holds which named export, who owns it,
which inferlet runs where, which copies between workers are in flight, and where a prompt's
prefix is already cached.

This is the logic only: a plain thread-safe class (one lock, every public method takes it),
no Ray. The directory actor wraps one instance; each GPU worker keeps its own PageRegistry
for the pages themselves. The directory never touches pages: it answers with records saying
what a worker must do (`EndExport`, `DropHolder`, `CopyPlan`) and the caller delivers them.
Applying a release twice is harmless, so a caller that also ends things locally may.

Rules, mirrored from cluster.worker.page_registry:
- export names are global (one namespace over all workers), 1 to 256 bytes; a taken name is
  refused until it is unexported;
- a non-persistent export is unexported only by its owner, and ends with it; a persistent
  one may be unexported by anyone and outlives its owner;
- an export lives on the worker its owner runs on (that is where its pages are).

Importing a name exported on another worker needs a copy: `import_` answers with a `CopyPlan`
and opens a lease on the export until `end_lease` (the copy finished or failed). The open
leases are the export's reference count. Unexporting while leases are open is allowed, as in
the registry: the copy holds its own references on the source worker.

An export can move to another worker (to balance load, or to drain a worker before it is removed)
in two phases. `begin_move` records the move; the caller copies the pages to the destination and
exports them there; `finish_move` re-points the export (worker, pages) at the destination in one
step, keeping its name, id, meta, owner and prefix index, and says what the source must release.
Until the commit everything reads the source; imports from then on read the destination. A copy
that started before the commit still reads the source under its lease, so the source's pages go
only once those leases have ended (`MoveDone.open_leases`). Only persistent exports move: a
non-persistent one's pages are also the running inferlet's own, and end with it. Ending the export or
losing either worker cancels the move (`finish_move` then raises UnknownMove).

A running inferlet moves in one step, `move_owner`, once its host has copied its pages to the new
worker (cluster/actors/inferlet_move.py): refused while it has non-persistent exports or an import's
copy in flight.

The prefix index hashes each export's full pages of tokens as a chain (hash of the parent
block's hash and the block's tokens, like vLLM's prefix-caching block hashes), so a prompt
matches an export exactly when their first k pages of tokens agree.
"""
from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.actors.directory_invariants import invariant_problems
from cluster.actors.directory_records import (CopyPlan, DropHolder, EndExport, ExportInfo, ImportPlan, MoveDone,
                                              MovePlan, OwnerInfo, PrefixMatch, Reclaimed, WorkerLoad)
from cluster.errors import (DirectoryInvariantBroken, ExportNameTaken, ExportNotMovable, InferletNotMovable,
                            InvalidDirectoryRequest, NoLiveWorker, NotExportOwner, OwnerExists, UnknownExport,
                            UnknownMove, UnknownOwner, UnknownWorker, WorkerDead)
from cluster.worker.prefix_hashes import block_hashes

MAX_EXPORT_NAME_BYTES = 256  # as cluster.worker.page_registry (not imported: it pulls in torch)


# -- the directory ------------------------------------------------------------------------------

@dataclass
class _Worker:
    num_pages: int
    free_pages: int
    cached_pages: int = 0  # held only by its prefix cache
    live: bool = True
    running: int = 0  # owners placed on it


@dataclass
class _Export:
    export_id: int
    name: str
    worker_id: str
    pages: tuple[int, ...]
    meta: str
    owner: str
    persistent: bool
    hashes: tuple[bytes, ...]  # one per indexed full page
    num_imports: int = 0
    leases: set[int] = field(default_factory=set)  # open copy leases: the reference count
    move: int | None = None  # the id of its move in flight, if any


@dataclass
class _Lease:
    plan: CopyPlan
    export_id: int  # its export may have ended since (then no live export has this id)


@dataclass
class _Move:
    plan: MovePlan
    export_id: int  # always a live export: ending it cancels the move


class KvDirectory:
    def __init__(self, page_size: int, cache_key: str = ""):
        if page_size < 1:
            raise InvalidDirectoryRequest(f"page_size must be at least 1, not {page_size}")
        self.page_size = page_size
        self.cache_key = cache_key  # the model (and adapter): prefixes match only under the same key
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._owners: dict[str, OwnerInfo] = {}
        self._exports: dict[str, _Export] = {}  # live exports by name
        self._by_id: dict[int, _Export] = {}  # live exports by id
        self._by_owner: dict[str, set[int]] = {}  # instance id -> ids of its live exports
        self._blocks: dict[bytes, set[int]] = {}  # block hash -> ids of live exports holding it
        self._leases: dict[int, _Lease] = {}
        self._moves: dict[int, _Move] = {}
        self._ids = itertools.count(1)  # export, lease and move ids, never reused

    # -- workers ---------------------------------------------------------------------------------
    def register(self, worker_id: str, num_pages: int, page_size: int | None = None) -> Reclaimed:
        """A worker (re)joins with an empty KV cache. Registering an id that is still live means
        it restarted before its death was noticed: its old state is dropped as by `worker_died`,
        and that is returned."""
        if num_pages < 1:
            raise InvalidDirectoryRequest(f"worker {worker_id!r} registers {num_pages} KV pages; it needs at least 1")
        if page_size is not None and page_size != self.page_size:
            raise InvalidDirectoryRequest(f"worker {worker_id!r} has {page_size}-token pages; this directory indexes "
                                          f"{self.page_size}-token pages. Run one page size per directory")
        with self._lock:
            old = self._workers.get(worker_id)
            lost = self._worker_lost(worker_id) if old is not None and old.live else Reclaimed()
            self._workers[worker_id] = _Worker(num_pages, num_pages)
            return lost

    def worker_died(self, worker_id: str) -> Reclaimed:
        """Mark a worker dead: its inferlets end, its exports and the copies from or to it are
        dropped. It stays known (as dead) until it registers again or is forgotten."""
        with self._lock:
            worker = self._worker(worker_id, live=False)
            if not worker.live:
                return Reclaimed()
            return self._worker_lost(worker_id)

    def forget(self, worker_id: str) -> Reclaimed:
        """Remove a worker for good (scale-in); a live one is first dropped as by `worker_died`."""
        with self._lock:
            worker = self._worker(worker_id, live=False)
            lost = self._worker_lost(worker_id) if worker.live else Reclaimed()
            del self._workers[worker_id]
            return lost

    def report_load(self, worker_id: str, free_pages: int, cached_pages: int = 0) -> None:
        with self._lock:
            worker = self._worker(worker_id)
            if not (0 <= free_pages <= worker.num_pages and 0 <= cached_pages <= worker.num_pages - free_pages):
                raise InvalidDirectoryRequest(f"worker {worker_id!r} reports {free_pages} free and {cached_pages} "
                                              f"cached pages of {worker.num_pages}")
            worker.free_pages, worker.cached_pages = free_pages, cached_pages

    def workers(self) -> list[WorkerLoad]:
        with self._lock:
            exports = collections.Counter(e.worker_id for e in self._exports.values())
            return [WorkerLoad(w_id, w.live, w.num_pages, w.free_pages, w.running, exports[w_id], w.cached_pages)
                    for w_id, w in sorted(self._workers.items())]

    # -- owners (running inferlets) --------------------------------------------------------------
    def add_owner(self, instance_id: str, host_id: str, worker_id: str) -> OwnerInfo:
        """An inferlet starts on `host_id` with its passes on `worker_id`."""
        with self._lock:
            return self._add_owner(instance_id, host_id, worker_id)

    def place_owner(self, instance_id: str, host_id: str, prompt_tokens: Sequence[int] = ()) -> OwnerInfo:
        """`place` and `add_owner` in one step, so concurrent launches see each other's load."""
        with self._lock:
            return self._add_owner(instance_id, host_id, self._place(prompt_tokens))

    def owner(self, instance_id: str) -> OwnerInfo:
        with self._lock:
            return self._owner(instance_id)

    def move_owner(self, instance_id: str, to_worker: str) -> OwnerInfo:
        """A running inferlet's pages were copied to `to_worker` (cluster.actors.inferlet_move): from now on
        its passes, pages and exports are there. Refused while it has non-persistent exports (their
        pages would stay behind) or an import's copy in flight (it writes to the old worker)."""
        with self._lock:
            owner = self._owner(instance_id)
            dest = self._destination(f"inferlet {instance_id!r}", owner.worker_id, to_worker)
            exported = sorted(self._by_id[i].name for i in self._by_owner.get(instance_id, ())
                              if not self._by_id[i].persistent)
            if exported:
                raise InferletNotMovable(f"inferlet {instance_id!r} exports {exported[0]!r} (not persistent): those "
                                       f"pages are shared from worker {owner.worker_id!r} and cannot move with it; "
                                       f"move it after it unexports them")
            if any(lease.plan.importer == instance_id for lease in self._leases.values()):
                raise InferletNotMovable(f"inferlet {instance_id!r} has an import's copy in flight to worker "
                                       f"{owner.worker_id!r}; move it once the copy is done")
            self._workers[owner.worker_id].running -= 1
            dest.running += 1
            moved = self._owners[instance_id] = OwnerInfo(instance_id, owner.host_id, to_worker)
            return moved

    def owner_ended(self, instance_id: str) -> Reclaimed:
        """The inferlet ended (exited, trapped, lost its client): its non-persistent exports end,
        its copies in flight are cancelled, and its worker drops what it held."""
        with self._lock:
            return self._end_owner(self._owner(instance_id), worker_live=True)

    def host_died(self, host_id: str) -> Reclaimed:
        """Every inferlet on the host ends as by `owner_ended`."""
        with self._lock:
            reclaimed = Reclaimed()
            for owner in [o for o in self._owners.values() if o.host_id == host_id]:
                reclaimed += self._end_owner(owner, worker_live=True)
            return reclaimed

    # -- exports ---------------------------------------------------------------------------------
    def export(self, owner: str, name: str, pages: Sequence[int], meta: str = "", persistent: bool = False,
               tokens: Sequence[int] = ()) -> ExportInfo:
        """Register `pages` (on the owner's worker) under `name`. `tokens` are the token ids its
        slots hold from the first slot on; their full pages go into the prefix index."""
        if not name or len(name.encode()) > MAX_EXPORT_NAME_BYTES:
            raise InvalidDirectoryRequest(f"an export name must have 1 to {MAX_EXPORT_NAME_BYTES} bytes")
        pages = tuple(int(p) for p in pages)
        if len(tokens) > len(pages) * self.page_size:
            raise InvalidDirectoryRequest(f"{len(tokens)} tokens do not fit in {len(pages)} pages of "
                                          f"{self.page_size} slots; pass the tokens the pages hold")
        hashes = tuple(block_hashes(tokens, self.page_size, self.cache_key))
        with self._lock:
            info = self._owner(owner)
            worker = self._worker(info.worker_id)
            bad = [p for p in pages if not 0 <= p < worker.num_pages]
            if bad:
                raise InvalidDirectoryRequest(f"page {bad[0]} is not a page of worker {info.worker_id!r} "
                                              f"(it has {worker.num_pages})")
            if name in self._exports:
                raise ExportNameTaken(f"the name {name!r} is already exported (on worker "
                                      f"{self._exports[name].worker_id!r}); unexport it first or pick another")
            export = _Export(next(self._ids), name, info.worker_id, pages, meta, owner, persistent, hashes)
            self._exports[name] = self._by_id[export.export_id] = export
            self._by_owner.setdefault(owner, set()).add(export.export_id)
            for h in hashes:
                self._blocks.setdefault(h, set()).add(export.export_id)
            return self._info(export)

    def lookup(self, name: str) -> ExportInfo:
        with self._lock:
            return self._info(self._export(name))

    def list_exports(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._exports if n.startswith(prefix))

    def exports_on(self, worker_id: str) -> list[ExportInfo]:
        """The live exports whose pages `worker_id` holds, by name."""
        with self._lock:
            return [self._info(e) for _, e in sorted(self._exports.items()) if e.worker_id == worker_id]

    def unexport(self, caller: str, name: str) -> EndExport:
        """End an export. `caller` is an instance id: the owner, or anyone for a persistent export."""
        with self._lock:
            export = self._export(name)
            if not export.persistent and export.owner != caller:
                raise NotExportOwner(f"{name!r} was exported by another inferlet; only it can unexport it")
            self._end_export(export)
            return EndExport(export.worker_id, name, export.pages)

    def import_(self, importer: str, name: str) -> ImportPlan:
        """Where the importer gets `name`'s pages: in place on its own worker, or by a copy from the
        export's worker (a lease is opened; end it with `end_lease` when the copy is over)."""
        with self._lock:
            owner = self._owner(importer)
            export = self._export(name)
            export.num_imports += 1
            copy = None
            if owner.worker_id != export.worker_id:
                copy = CopyPlan(next(self._ids), name, importer, export.worker_id, export.pages, owner.worker_id)
                self._leases[copy.lease_id] = _Lease(copy, export.export_id)
                export.leases.add(copy.lease_id)
            return ImportPlan(name, export.meta, export.worker_id, export.pages, copy)

    def end_lease(self, lease_id: int) -> bool:
        """The copy finished or failed. False when the lease was already gone (a worker or the
        importer ended meanwhile, and the copy was reported as cancelled then)."""
        with self._lock:
            return self._close_lease(lease_id) is not None

    def copies_in_flight(self) -> list[CopyPlan]:
        with self._lock:
            return [lease.plan for _, lease in sorted(self._leases.items())]

    # -- moving an export to another worker ------------------------------------------------------
    def begin_move(self, name: str, to_worker: str) -> MovePlan:
        """Start moving export `name` to worker `to_worker`. The caller copies `src_pages` there, exports
        the copy on it, then calls `finish_move` (or `abort_move` when anything failed)."""
        with self._lock:
            export = self._export(name)
            self._destination(repr(name), export.worker_id, to_worker)
            if not export.persistent:
                raise ExportNotMovable(f"{name!r} is not persistent: its pages live with the running inferlet "
                                       f"{export.owner!r} on worker {export.worker_id!r} and end with it. Export it "
                                       f"persistent to make it movable")
            if export.move is not None:
                raise ExportNotMovable(f"{name!r} is already moving to worker "
                                       f"{self._moves[export.move].plan.dst_worker!r} (move {export.move}); wait "
                                       f"for that move to finish, or abort it")
            plan = MovePlan(next(self._ids), name, export.worker_id, export.pages, to_worker, export.meta)
            self._moves[plan.move_id] = _Move(plan, export.export_id)
            export.move = plan.move_id
            return plan

    def finish_move(self, move_id: int, dest_pages: Sequence[int]) -> MoveDone:
        """The copy is on the destination (its pages `dest_pages` there, exported under the name): the
        export lives there from now on. The answer says what the source worker must release, and when."""
        dest_pages = tuple(int(p) for p in dest_pages)
        with self._lock:
            move = self._moves.get(move_id)
            if move is None:
                raise UnknownMove(f"no move {move_id} is in flight: it finished or was aborted, or it was "
                                  f"cancelled because its export ended or a worker it involves died. Release "
                                  f"the copy made for it on the destination")
            plan, export = move.plan, self._by_id[move.export_id]
            dest = self._workers[plan.dst_worker]  # live: losing it cancels the move
            if len(dest_pages) != len(plan.src_pages):
                raise InvalidDirectoryRequest(f"move {move_id} copies {len(plan.src_pages)} pages of {plan.name!r}; "
                                              f"{len(dest_pages)} pages were given for the destination")
            bad = [p for p in dest_pages if not 0 <= p < dest.num_pages]
            if bad:
                raise InvalidDirectoryRequest(f"page {bad[0]} is not a page of worker {plan.dst_worker!r} "
                                              f"(it has {dest.num_pages})")
            del self._moves[move_id]
            export.move = None
            export.worker_id, export.pages = plan.dst_worker, dest_pages
            open_leases = tuple(sorted(i for i in export.leases if self._leases[i].plan.src_worker == plan.src_worker))
            return MoveDone(self._info(export), EndExport(plan.src_worker, plan.name, plan.src_pages), open_leases)

    def abort_move(self, move_id: int) -> bool:
        """Drop a move in flight: the export stays on its source. False when it was already gone
        (finished, aborted or cancelled)."""
        with self._lock:
            move = self._moves.pop(move_id, None)
            if move is None:
                return False
            self._by_id[move.export_id].move = None
            return True

    def moves_in_flight(self) -> list[MovePlan]:
        with self._lock:
            return [move.plan for _, move in sorted(self._moves.items())]

    # -- prefixes and placement ------------------------------------------------------------------
    def prefix_match(self, prompt_tokens: Sequence[int]) -> PrefixMatch:
        """The longest prefix of the prompt, in full pages, that some live export holds."""
        with self._lock:
            return self._prefix_match(prompt_tokens)

    def place(self, prompt_tokens: Sequence[int] = ()) -> str:
        """The worker for a new inferlet: the live worker holding the longest cached prefix of its
        prompt; among several (or with none cached) the least loaded. Records nothing."""
        with self._lock:
            return self._place(prompt_tokens)

    # -- checks ----------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise DirectoryInvariantBroken unless the bookkeeping agrees with itself."""
        with self._lock:
            problems = invariant_problems(self)
        if problems:
            raise DirectoryInvariantBroken("; ".join(problems[:8]))

    # -- internals (under the lock) --------------------------------------------------------------
    def _worker(self, worker_id: str, live: bool = True) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(f"no worker {worker_id!r} is registered; known: {sorted(self._workers)}")
        if live and not worker.live:
            raise WorkerDead(f"worker {worker_id!r} died and has not registered again; its pages are gone. "
                             f"Place the inferlet elsewhere or wait for the worker to rejoin")
        return worker

    def _owner(self, instance_id: str) -> OwnerInfo:
        owner = self._owners.get(instance_id)
        if owner is None:
            raise UnknownOwner(f"no running inferlet {instance_id!r} is known to the directory; "
                               f"it ended or was never added")
        return owner

    def _destination(self, what: str, from_worker: str, to_worker: str) -> _Worker:
        """The live worker `to_worker`, other than `from_worker`, that `what` may move to."""
        dest = self._workers.get(to_worker)
        if dest is None:
            raise UnknownWorker(f"cannot move {what} to {to_worker!r}: no such worker is registered; "
                                f"known: {sorted(self._workers)}")
        if not dest.live:
            raise WorkerDead(f"cannot move {what} to worker {to_worker!r}: it died and has not registered "
                             f"again; pick a live worker")
        if to_worker == from_worker:
            raise InvalidDirectoryRequest(f"{what} is already on worker {to_worker!r}; nothing to move")
        return dest

    def _export(self, name: str) -> _Export:
        export = self._exports.get(name)
        if export is None:
            raise UnknownExport(f"nothing is exported under {name!r}")
        return export

    def _info(self, e: _Export) -> ExportInfo:
        moving_to = self._moves[e.move].plan.dst_worker if e.move is not None else ""
        return ExportInfo(e.name, e.worker_id, e.pages, e.meta, e.owner, e.persistent,
                          len(e.hashes) * self.page_size, e.num_imports, len(e.leases), moving_to)

    def _add_owner(self, instance_id: str, host_id: str, worker_id: str) -> OwnerInfo:
        if instance_id in self._owners:
            raise OwnerExists(f"an inferlet {instance_id!r} is already running (on worker "
                              f"{self._owners[instance_id].worker_id!r}); instance ids must be unique")
        self._worker(worker_id).running += 1
        owner = self._owners[instance_id] = OwnerInfo(instance_id, host_id, worker_id)
        return owner

    def _end_owner(self, owner: OwnerInfo, worker_live: bool) -> Reclaimed:
        del self._owners[owner.instance_id]
        self._workers[owner.worker_id].running -= 1
        ended = [self._by_id[i] for i in sorted(self._by_owner.get(owner.instance_id, ()))
                 if not self._by_id[i].persistent]
        for export in ended:
            self._end_export(export)
        copies = self._close_leases(lambda plan: plan.importer == owner.instance_id)
        releases = ()
        if worker_live:
            releases = tuple(EndExport(e.worker_id, e.name, e.pages) for e in ended)
            releases += (DropHolder(owner.worker_id, owner.instance_id),)
        return Reclaimed((owner,), tuple(self._info(e) for e in ended), copies, releases)

    def _worker_lost(self, worker_id: str) -> Reclaimed:
        reclaimed = Reclaimed()
        for owner in [o for o in self._owners.values() if o.worker_id == worker_id]:
            reclaimed += self._end_owner(owner, worker_live=False)
        dropped = [e for e in self._exports.values() if e.worker_id == worker_id]  # the persistent ones left
        for export in dropped:
            self._end_export(export)
        copies = self._close_leases(lambda plan: worker_id in (plan.src_worker, plan.dst_worker))
        for move_id in [i for i, m in self._moves.items() if m.plan.dst_worker == worker_id]:
            self._cancel_move(move_id)  # those from it went with their exports
        self._workers[worker_id].live = False
        self._workers[worker_id].running = 0
        return reclaimed + Reclaimed((), tuple(self._info(e) for e in dropped), copies, ())

    def _close_lease(self, lease_id: int) -> CopyPlan | None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        export = self._by_id.get(lease.export_id)
        if export is not None:
            export.leases.discard(lease_id)
        return lease.plan

    def _close_leases(self, which) -> tuple[CopyPlan, ...]:
        return tuple(self._close_lease(i) for i in sorted(self._leases) if which(self._leases[i].plan))

    def _cancel_move(self, move_id: int) -> None:
        move = self._moves.pop(move_id)
        self._by_id[move.export_id].move = None

    def _end_export(self, export: _Export) -> None:
        if export.move is not None:
            self._cancel_move(export.move)
        del self._exports[export.name]
        del self._by_id[export.export_id]
        of_owner = self._by_owner[export.owner]
        of_owner.discard(export.export_id)
        if not of_owner:
            del self._by_owner[export.owner]
        for h in export.hashes:
            holders = self._blocks[h]
            holders.discard(export.export_id)
            if not holders:
                del self._blocks[h]

    def _prefix_match(self, prompt_tokens: Sequence[int]) -> PrefixMatch:
        depth, holders = 0, set()
        for h in block_hashes(prompt_tokens, self.page_size, self.cache_key):
            ids = self._blocks.get(h)
            if not ids:
                break
            depth, holders = depth + 1, ids
        exports = [self._by_id[i] for i in holders]
        return PrefixMatch(depth * self.page_size, tuple(sorted({e.worker_id for e in exports})),
                           tuple(sorted(e.name for e in exports)))

    def _place(self, prompt_tokens: Sequence[int]) -> str:
        live = [w_id for w_id, w in self._workers.items() if w.live]
        if not live:
            raise NoLiveWorker("no live GPU worker is registered; start workers (or wait for a restarted one "
                               "to rejoin) before launching inferlets")
        return min(self._prefix_match(prompt_tokens).worker_ids or live, key=self._load_key)

    def _load_key(self, worker_id: str) -> tuple:
        """Fewest running inferlets, then the largest share of free pages, then the id (stable)."""
        worker = self._workers[worker_id]
        return worker.running, -worker.free_pages / worker.num_pages, worker_id
