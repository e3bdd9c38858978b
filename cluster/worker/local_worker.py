"""The handler calls of one executor, in process: what an inferlet host asks of a worker.

An inferlet's imports reach its worker only through these methods, named for the handler
calls of the API (allocate, free, copy, mask, export, import, unexport, list, cache lookup
and store, forward, release). In embedded mode the host calls a LocalWorker directly; in cluster mode a GPU
worker actor serves the same methods to many hosts over the handler-call service, so both
modes run this one class. Every method checks the caller (`holder`, an inferlet instance
id) against the page registry before anything reaches the executor.

Copies and masks are checked at once and then queued for the executor thread without
waiting: they take effect before any pass submitted after them.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from cluster.worker.batcher import Batcher, BatchPolicy
from cluster.worker.page_registry import PageRegistry, PageRefused
from cluster.pending import Pending
from cluster.worker.prefill_chunks import written_pages
from workers.executor import Executor, ModelInfo
from workers.step_types import ForwardRequest
from workers.step_validation import StepLimits, validate_request
from workers.tokenizer import Tokenizer

log = logging.getLogger("pie.worker")


class LocalWorker:
    def __init__(self, executor: Executor, policy: BatchPolicy = BatchPolicy(),
                 max_persistent_pages: int | None = None):
        self.executor = executor
        self.batcher = Batcher(executor, policy)
        self.pages = PageRegistry(executor, max_persistent_pages)
        info = executor.info
        self._step_limits = StepLimits(info.num_pages, info.page_size, info.vocab_size, info.max_position)
        self._holding = threading.local()  # .on: this thread holds (see hold); .held: a pass waits for flush

    @property
    def info(self) -> ModelInfo:
        return self.executor.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.executor.tokenizer

    @property
    def num_free_pages(self) -> int:
        return self.executor.num_free_pages

    # -- pages -----------------------------------------------------------------------------------
    def allocate(self, holder: str, count: int, quota: int) -> list[int]:
        return self.pages.allocate(holder, count, quota)

    def free(self, holder: str, pages: list[int]) -> None:
        self.pages.free(holder, pages)

    def copy(self, holder: str, src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        page_size = self.info.page_size
        self.pages.require_readable(holder, [src])
        self.pages.require_writable(holder, [dst])
        if min(src_start, dst_start, length) < 0 or max(src_start, dst_start) + length > page_size:
            raise PageRefused(f"copying {length} slots from {src_start} to {dst_start} runs past a page of "
                              f"{page_size}")
        self._on_executor(holder, (src, dst), lambda ex: ex.copy_slots(src, dst, src_start, dst_start, length))

    def mask(self, holder: str, page: int, masked: list[bool]) -> None:
        self.pages.require_writable(holder, [page])
        if len(masked) != self.info.page_size:
            raise PageRefused(f"the slot mask has {len(masked)} entries; a page has {self.info.page_size} slots")
        self._on_executor(holder, (page,), lambda ex: ex.mask_slots(page, masked))

    def _on_executor(self, holder: str, pages: tuple[int, ...], fn) -> None:
        """Queue fn for the executor thread with the pages pinned until it has run."""
        done = self._queued(pages, fn)
        done.on_done(lambda r: r.error and log.error("%s: queued page operation failed: %r", holder, r.error))

    # -- sharing ---------------------------------------------------------------------------------
    def export(self, holder: str, name: str, pages: list[int], meta: str, persistent: bool) -> None:
        self.pages.export(holder, name, pages, meta, persistent)

    def import_(self, holder: str, name: str) -> tuple[list[int], str]:
        return self.pages.import_(holder, name)

    def import_later(self, holder: str, name: str) -> Pending:
        """import_ as a Pending, as every worker offers it (a cluster's may have to copy pages first):
        here the pages are shared at once."""
        try:
            return Pending.ready(self.import_(holder, name))
        except Exception as e:
            return Pending.failed(e)

    def unexport(self, holder: str, name: str) -> None:
        self.pages.unexport(holder, name)

    def list_exports(self, prefix: str = "") -> list[str]:
        return self.pages.list_exports(prefix)

    # -- the prefix cache (pages of earlier inferlets, by the chained hash of their tokens) -------
    def cache_lookup(self, holder: str, hashes: list[bytes]) -> list[int]:
        return self.pages.cache_lookup(holder, hashes)

    def cache_store(self, holder: str, hashes: list[bytes], pages: list[int]) -> int:
        return self.pages.cache_store(holder, hashes, pages)

    # -- moving pages between workers (cluster mode: an import of a name exported elsewhere) ----
    def read_pages(self, holder: str, pages: list[int]) -> Pending:
        """The contents of pages the holder may read (executor.read_pages), taken on the executor
        thread before its next step; the Pending completes with the bytes."""
        self.pages.require_readable(holder, pages)
        return self._queued(tuple(pages), lambda ex: ex.read_pages(list(pages)))

    def write_pages(self, holder: str, pages: list[int], data: bytes) -> Pending:
        """Overwrite pages the holder may write with read_pages' bytes from another worker."""
        self.pages.require_writable(holder, pages)
        return self._queued(tuple(pages), lambda ex: ex.write_pages(list(pages), data))

    def _queued(self, pages: tuple[int, ...], fn) -> Pending:
        """fn(executor) on the executor thread, the pages pinned until it has run."""
        self.pages.pin(pages)
        done = self.batcher.call(fn)
        done.on_done(lambda _: self.pages.unpin(pages))
        return done

    def holding(self, holder: str) -> tuple[list[list], list[str]]:
        """The holder's pages ([page, references, writable]) and non-persistent exports here: what a
        move of the running inferlet to another worker copies, or refuses (cluster.actors.inferlet_move)."""
        return self.pages.holding(holder)

    # -- forward passes --------------------------------------------------------------------------
    def forward(self, holder: str, request: ForwardRequest) -> Pending:
        """Check and queue one pass; the Pending completes with its list of OutputResult.

        Raises InvalidRequestError for a malformed pass and PageRefused for pages the holder
        may not read (or, for the slots it writes, may not write)."""
        validate_request(request, self._step_limits)
        held = tuple(np.asarray(request.kv_page_indices).tolist())
        self.pages.require_readable(holder, held)
        self.pages.require_writable(holder, sorted(written_pages(request, self.info.page_size)))
        self.pages.pin(held)
        holding = getattr(self._holding, "on", False)
        result = self.batcher.forward(request, wake=not holding)
        if holding:
            self._holding.held = True
        result.on_done(lambda _: self.pages.unpin(held))
        return result

    def hold(self) -> None:
        """Until flush(), this thread's passes are queued without waking the executor thread.

        The scheduler holds around a round of polls, the worker service around a frame of calls:
        woken at the first pass, the executor thread would start the step (taking the GIL between
        torch ops) while the round's guests still run, and a guest's next import then waits for
        the GIL, up to Python's 5 ms switch interval, in the middle of the step."""
        self._holding.on, self._holding.held = True, False

    def flush(self) -> None:
        """Wake the executor thread for the passes held since hold()."""
        self._holding.on = False
        if getattr(self._holding, "held", False):
            self._holding.held = False
            self.batcher.wake()

    # -- ending ----------------------------------------------------------------------------------
    def release(self, holder: str) -> None:
        """The inferlet ended: give back its pages and its non-persistent exports."""
        self.pages.drop_holder(holder)

    def check_idle(self) -> None:
        self.pages.check_idle()

    def close(self) -> None:
        self.batcher.close()
        self.pages.drop_cache()
