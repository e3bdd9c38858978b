"""The records the KV-page directory answers with (cluster.actors.kv_directory): exports, owners,
worker loads, copy and move plans and what a worker must release. Frozen dataclasses, safe to send
between actors."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportInfo:
    name: str
    worker_id: str  # the worker whose KV cache holds the pages
    pages: tuple[int, ...]  # page ids on that worker, in KV-sequence order
    meta: str  # the exporter's description for importers
    owner: str  # instance id of the exporter (may have ended, for a persistent export)
    persistent: bool  # outlives its owner until unexported
    num_indexed_tokens: int  # tokens in the prefix index: full pages only, 0 = not indexed
    num_imports: int  # imports so far, same-worker and copies
    copies_in_flight: int  # open leases: copies from this export to another worker
    moving_to: str = ""  # the worker a move in flight copies it to; "" when none is


@dataclass(frozen=True)
class OwnerInfo:
    instance_id: str
    host_id: str  # the inferlet host actor that runs its sandbox
    worker_id: str  # the GPU worker its passes and pages are on


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    live: bool
    num_pages: int  # the worker's KV pages in all
    free_pages: int  # as last reported by the worker (num_pages until its first report)
    running: int  # inferlets placed on it that have not ended
    num_exports: int  # exports whose pages it holds
    cached_pages: int = 0  # held only by its prefix cache, as last reported


@dataclass(frozen=True)
class CopyPlan:
    """Copy the pages of export `name` from one worker to another for an importer. The lease
    stays open (the export's reference count includes it) until `end_lease(lease_id)`."""

    lease_id: int
    name: str
    importer: str  # instance id that receives the copy (a holder on dst_worker)
    src_worker: str
    src_pages: tuple[int, ...]  # page ids on src_worker, in order; the last may be partly filled
    dst_worker: str


@dataclass(frozen=True)
class ImportPlan:
    """Where an import's pages are. `copy` is None when the importer runs on the export's worker
    (it takes references there); else the pages must be copied first."""

    name: str
    meta: str
    worker_id: str  # where the export's pages are
    pages: tuple[int, ...]  # page ids on worker_id
    copy: CopyPlan | None


@dataclass(frozen=True)
class MovePlan:
    """Move export `name` from `src_worker` to `dst_worker` (kv_directory.begin_move). The export stays
    on the source, readable and importable there, until `finish_move(move_id, ...)` re-points it."""

    move_id: int
    name: str
    src_worker: str
    src_pages: tuple[int, ...]  # page ids on src_worker, in order; the last may be partly filled
    dst_worker: str
    meta: str  # the export's meta, for its export on the destination


@dataclass(frozen=True)
class EndExport:
    """Worker `worker_id` ends its local export `name` (drops the export's reference to its pages)."""

    worker_id: str
    name: str
    pages: tuple[int, ...]


@dataclass(frozen=True)
class DropHolder:
    """Worker `worker_id` drops every reference the ended inferlet `instance_id` holds there."""

    worker_id: str
    instance_id: str


@dataclass(frozen=True)
class MoveDone:
    """A move committed (kv_directory.finish_move): the export now lives on the destination. The source
    ends its export of the old pages (`release`) once the copies from them in flight (`open_leases`,
    opened before the commit, still reading the source) have ended."""

    export: ExportInfo  # as it is now, on the destination
    release: EndExport  # for the source worker
    open_leases: tuple[int, ...]  # lease ids of copies from the source still in flight


@dataclass(frozen=True)
class Reclaimed:
    """What ending owners, a host or a worker took away, and what live workers must release."""

    owners: tuple[OwnerInfo, ...] = ()  # inferlets ended: fail those still running with the cause
    exports: tuple[ExportInfo, ...] = ()  # exports dropped (those on a dead worker are gone with it)
    copies: tuple[CopyPlan, ...] = ()  # copies in flight cancelled: their imports fail
    releases: tuple[EndExport | DropHolder, ...] = ()  # for live workers only; idempotent

    def __add__(self, other: Reclaimed) -> Reclaimed:
        return Reclaimed(self.owners + other.owners, self.exports + other.exports,
                         self.copies + other.copies, self.releases + other.releases)


@dataclass(frozen=True)
class PrefixMatch:
    num_tokens: int  # tokens of the prompt's longest cached prefix (a multiple of page_size)
    worker_ids: tuple[str, ...]  # live workers holding exactly that much of it, sorted
    names: tuple[str, ...]  # exports that hold it, sorted
