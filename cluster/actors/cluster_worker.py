"""The worker an inferlet host sees in cluster mode: its own worker, plus the global directory.

ClusterWorker has LocalWorker's methods. Pages and passes go to the inferlet's worker over
the handler-call service (a RemoteWorker). Names are global: an export is claimed in the
KV-page directory first, then made on the worker; an import asks the directory where the
name lives. On the inferlet's own worker it is shared in place, as in embedded mode; on
another worker its pages are copied across: the source worker takes references for the
copy's lease (so an unexport meanwhile cannot free them), its pages are read in chunks,
written into pages allocated for the importer here, and the lease ends. The importer owns
the copy (its quota counts it) and it is released with the importer like any page it holds.
The copy runs on a background thread (import_later): the importer waits for it, the host's
scheduler thread and its other inferlets do not.

An inferlet moved to another worker (`move`, cluster/actors/inferlet_move.py) still runs on this
worker's host; its calls go where its route says, its page ids translated (cluster/actors/page_map.py).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from cluster.actors import inferlet_move
from cluster.actors.directory_records import ImportPlan
from cluster.actors.page_copy import copy_pages
from cluster.worker.prefill_chunks import written_pages
from cluster.worker.prefix_hashes import tokens_from_sdk_meta
from cluster.pending import Pending
from cluster.rpc.remote_worker import RemoteWorker
from workers.executor import ModelInfo
from workers.step_types import ForwardRequest
from workers.tokenizer import Tokenizer

log = logging.getLogger("pie.cluster")

COPY_THREADS = 4  # copies across workers in flight at once, per worker a host runs inferlets on


class ClusterWorker:
    def __init__(self, worker_id: str, remote: RemoteWorker, directory, peer: Callable[[str], RemoteWorker],
                 import_quota: int):
        """`directory`: a Directory or DirectoryHandle; `peer(worker_id)`: a connection to another
        worker (the source of a copy); `import_quota`: the page quota a copied import counts against."""
        self.worker_id = worker_id
        self.remote = remote
        self.directory = directory
        self._peer = peer
        self._import_quota = import_quota
        self._copies = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="kv-copy")
        self.routes = inferlet_move.Routes()  # the inferlets of this worker's host that moved to another

    info: ModelInfo = property(lambda self: self.remote.info)
    tokenizer: Tokenizer = property(lambda self: self.remote.tokenizer)
    num_free_pages: int = property(lambda self: self.remote.num_free_pages)
    target: str = property(lambda self: self.remote.target)

    # -- the inferlet's own worker (or, once it moved, the one its route names) --------------------
    def allocate(self, holder: str, count: int, quota: int) -> list[int]:
        with self.routes.calling(holder) as route:
            if route is None:
                return self.remote.allocate(holder, count, quota)
            return route.virtual(route.remote.allocate(holder, count, quota))

    def free(self, holder: str, pages: list[int]) -> None:
        with self.routes.calling(holder) as route:
            if route is None:
                self.remote.free(holder, pages)
            else:
                route.free(holder, pages)

    def copy(self, holder: str, src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        with self.routes.calling(holder) as route:
            if route is None:
                self.remote.copy(holder, src, dst, src_start, dst_start, length)
            else:
                [dst] = route.writable([dst])
                route.remote.copy(holder, route.physical([src])[0], dst, src_start, dst_start, length)

    def mask(self, holder: str, page: int, masked: list[bool]) -> None:
        with self.routes.calling(holder) as route:
            if route is None:
                self.remote.mask(holder, page, masked)
            else:
                route.remote.mask(holder, route.writable([page])[0], masked)

    def forward(self, holder: str, request: ForwardRequest) -> Pending:
        gate, route = self.routes.later(holder)
        if gate is not None:  # a move of this inferlet is in progress: the pass goes out after it
            return gate.then(lambda _: self.forward(holder, request))
        try:
            if route is None:
                result = self.remote.forward(holder, request)
            else:
                pages = route.physical(request.kv_page_indices)
                route.writable(written_pages(request, self.info.page_size))
                result = route.remote.forward(holder, replace(request, kv_page_indices=np.array(pages, np.int64)))
        except BaseException:
            self.routes.leave(holder)
            raise
        result.on_done(lambda _: self.routes.leave(holder))
        return result

    def cache_lookup(self, holder: str, hashes: list[bytes]) -> list[int]:
        with self.routes.calling(holder) as route:  # the worker's own cache: not in the directory
            if route is None:
                return self.remote.cache_lookup(holder, hashes)
            return route.virtual(route.remote.cache_lookup(holder, hashes))

    def cache_store(self, holder: str, hashes: list[bytes], pages: list[int]) -> int:
        with self.routes.calling(holder) as route:
            if route is None:
                return self.remote.cache_store(holder, hashes, pages)
            return route.remote.cache_store(holder, hashes, route.physical(pages))

    def hold(self) -> None:
        self.remote.hold()

    def flush(self) -> None:
        self.remote.flush()

    def release(self, holder: str) -> None:
        route = self.routes.pop(holder)
        (route.remote if route else self.remote).release(holder)

    def close(self) -> None:
        self._copies.shutdown(wait=False, cancel_futures=True)
        self.remote.close()

    # -- moving a running inferlet ---------------------------------------------------------------
    def move(self, holder: str, to_worker: str) -> inferlet_move.MovedInferlet:
        """Move inferlet `holder`'s pages (and its calls from now on) to `to_worker`, between its steps."""
        return inferlet_move.move_inferlet(self, holder, to_worker)

    def where(self, holder: str) -> str:
        """The worker inferlet `holder`'s calls go to now."""
        route = self.routes.route(holder)
        return route.worker_id if route else self.worker_id

    def connect(self, worker_id: str) -> RemoteWorker:
        return self.remote if worker_id == self.worker_id else self._peer(worker_id)

    # -- global names ----------------------------------------------------------------------------
    def export(self, holder: str, name: str, pages: list[int], meta: str, persistent: bool) -> None:
        with self.routes.calling(holder) as route:
            remote, pages = (self.remote, pages) if route is None else (route.remote, route.physical(pages))
            self.directory.export(holder, name, pages, meta, persistent, tokens_from_sdk_meta(meta))
            try:
                remote.export(holder, name, pages, meta, persistent)
            except Exception:
                self.directory.unexport(holder, name)  # the worker refused (pages not held, cap): undo the claim
                raise

    def unexport(self, holder: str, name: str) -> None:
        with self.routes.calling(holder):
            ended = self.directory.unexport(holder, name)
            self.connect(ended.worker_id).unexport(holder, name)

    def list_exports(self, prefix: str = "") -> list[str]:
        return self.directory.list_exports(prefix)

    def import_(self, holder: str, name: str) -> tuple[list[int], str]:
        return self.import_later(holder, name).wait()

    def import_later(self, holder: str, name: str) -> Pending:
        """import_ without blocking the caller (the host's scheduler thread) through a copy: a name on
        this worker is shared at once; one on another worker is copied on a background thread, as
        long as its size takes, while the host's other inferlets run. The Pending completes with
        (pages, meta) once the copy is done and its lease has ended."""
        gate, route = self.routes.later(holder)
        if gate is not None:  # a move of this inferlet is in progress: the import is made after it
            return gate.then(lambda _: self.import_later(holder, name))
        try:
            done = self._import(holder, name, route.remote if route else self.remote)
        except BaseException:
            self.routes.leave(holder)
            raise
        if route is not None:
            done = done.map(lambda value: (route.virtual(value[0]), value[1]))
        done.on_done(lambda _: self.routes.leave(holder))
        return done

    def _import(self, holder: str, name: str, remote: RemoteWorker) -> Pending:
        plan: ImportPlan = self.directory.import_(holder, name)
        if plan.copy is None:
            return remote.import_later(holder, name)
        done = Pending()

        def copy() -> None:  # completes `done` whatever happens, or the inferlet would wait forever
            error, pages = None, []
            try:
                pages = self._copy_in(holder, plan, remote)
            except BaseException as e:
                error = e
            try:
                self.directory.end_lease(plan.copy.lease_id)
            except BaseException as e:
                error = error or e
            if error is None:
                done.complete((pages, plan.meta))
            else:
                done.fail(error)

        self._copies.submit(copy)
        return done

    def _copy_in(self, holder: str, plan: ImportPlan, remote: RemoteWorker) -> list[int]:
        """The export's pages copied from their worker into new pages of `holder` on `remote`."""
        source = self._peer(plan.copy.src_worker)
        lease = f"lease-{plan.copy.lease_id}"  # a holder on the source worker for the copy's references
        try:
            src_pages, _ = source.import_(lease, plan.name)
            pages = remote.allocate(holder, len(src_pages), self._import_quota)
            try:
                copy_pages(source, lease, src_pages, remote, holder, pages)
            except BaseException:
                remote.free(holder, pages)
                raise
            log.info("%s: copied %d pages of %r from worker %s", holder, len(pages), plan.name, plan.copy.src_worker)
            return pages
        finally:
            source.release(lease)

