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
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cluster.actors.directory_records import ImportPlan
from cluster.worker.prefix_hashes import tokens_from_sdk_meta
from cluster.pending import Pending
from cluster.rpc.remote_worker import RemoteWorker
from workers.executor import ModelInfo
from workers.step_types import ForwardRequest
from workers.tokenizer import Tokenizer

log = logging.getLogger("pie.cluster")

COPY_CHUNK_PAGES = 8  # pages per read / write call when copying across workers (SmolLM2 fp32: 5.9 MB)
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

    info: ModelInfo = property(lambda self: self.remote.info)
    tokenizer: Tokenizer = property(lambda self: self.remote.tokenizer)
    num_free_pages: int = property(lambda self: self.remote.num_free_pages)
    target: str = property(lambda self: self.remote.target)

    # -- the inferlet's own worker ---------------------------------------------------------------
    def allocate(self, holder: str, count: int, quota: int) -> list[int]:
        return self.remote.allocate(holder, count, quota)

    def free(self, holder: str, pages: list[int]) -> None:
        self.remote.free(holder, pages)

    def copy(self, holder: str, src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        self.remote.copy(holder, src, dst, src_start, dst_start, length)

    def mask(self, holder: str, page: int, masked: list[bool]) -> None:
        self.remote.mask(holder, page, masked)

    def forward(self, holder: str, request: ForwardRequest) -> Pending:
        return self.remote.forward(holder, request)

    def cache_lookup(self, holder: str, hashes: list[bytes]) -> list[int]:
        return self.remote.cache_lookup(holder, hashes)  # the worker's own cache: not in the directory

    def cache_store(self, holder: str, hashes: list[bytes], pages: list[int]) -> int:
        return self.remote.cache_store(holder, hashes, pages)

    def hold(self) -> None:
        self.remote.hold()

    def flush(self) -> None:
        self.remote.flush()

    def release(self, holder: str) -> None:
        self.remote.release(holder)

    def close(self) -> None:
        self._copies.shutdown(wait=False, cancel_futures=True)
        self.remote.close()

    # -- global names ----------------------------------------------------------------------------
    def export(self, holder: str, name: str, pages: list[int], meta: str, persistent: bool) -> None:
        self.directory.export(holder, name, pages, meta, persistent, tokens_from_sdk_meta(meta))
        try:
            self.remote.export(holder, name, pages, meta, persistent)
        except Exception:
            self.directory.unexport(holder, name)  # the worker refused (pages not held, cap): undo the claim
            raise

    def unexport(self, holder: str, name: str) -> None:
        ended = self.directory.unexport(holder, name)
        if ended.worker_id == self.worker_id:
            self.remote.unexport(holder, name)
        else:
            self._peer(ended.worker_id).unexport(holder, name)

    def list_exports(self, prefix: str = "") -> list[str]:
        return self.directory.list_exports(prefix)

    def import_(self, holder: str, name: str) -> tuple[list[int], str]:
        return self.import_later(holder, name).wait()

    def import_later(self, holder: str, name: str) -> Pending:
        """import_ without blocking the caller (the host's scheduler thread) through a copy: a name on
        this worker is shared at once; one on another worker is copied on a background thread, as
        long as its size takes, while the host's other inferlets run. The Pending completes with
        (pages, meta) once the copy is done and its lease has ended."""
        plan: ImportPlan = self.directory.import_(holder, name)
        if plan.copy is None:
            return self.remote.import_later(holder, name)
        done = Pending()

        def copy() -> None:  # completes `done` whatever happens, or the inferlet would wait forever
            error, pages = None, []
            try:
                pages = self._copy_in(holder, plan)
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

    def _copy_in(self, holder: str, plan: ImportPlan) -> list[int]:
        """The export's pages copied from their worker into new pages of `holder` here."""
        source = self._peer(plan.copy.src_worker)
        lease = f"lease-{plan.copy.lease_id}"  # a holder on the source worker for the copy's references
        try:
            src_pages, _ = source.import_(lease, plan.name)
            pages = self.remote.allocate(holder, len(src_pages), self._import_quota)
            try:
                copy_pages(source, lease, src_pages, self.remote, holder, pages)
            except BaseException:
                self.remote.free(holder, pages)
                raise
            log.info("%s: copied %d pages of %r from worker %s", holder, len(pages), plan.name, plan.copy.src_worker)
            return pages
        finally:
            source.release(lease)


def copy_pages(source: RemoteWorker, src_holder: str, src_pages: list[int], dest: RemoteWorker, dst_holder: str,
               dst_pages: list[int]) -> None:
    """Copy pages' contents from one worker to another, COPY_CHUNK_PAGES at a time: read_pages on the
    source (pages `src_holder` holds there), write_pages on the destination (pages `dst_holder` may write).
    An import's copy and an export's move (cluster.actors.kv_migration) both go this way."""
    for at in range(0, len(src_pages), COPY_CHUNK_PAGES):
        chunk = slice(at, at + COPY_CHUNK_PAGES)
        data = source.wait(source.read_pages(src_holder, src_pages[chunk]))
        dest.wait(dest.write_pages(dst_holder, dst_pages[chunk], data))
