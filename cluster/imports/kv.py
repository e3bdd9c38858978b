"""kv: allocate, free, copy, mask, and sharing pages under names.

Copies and masks are checked at once, then queued for the executor thread without waiting:
they take effect before any pass submitted after them (a fork's copy costs no step).
"""
from __future__ import annotations

import logging

from cluster.imports._common import raw, sync
from cluster.session import InferletSession
from cluster.wit_values import Refused

log = logging.getLogger("pie.inferlet")


def imports(s: InferletSession) -> dict:
    pages, batcher = s.services.pages, s.services.batcher
    me = s.instance_id
    page_size = s.services.executor.info.page_size

    def allocate(count: int) -> list[int]:
        return pages.allocate(me, count, s.limits.max_pages)

    def free(ids: list[int]) -> None:
        pages.free(me, ids)

    def on_executor(ids: tuple[int, ...], fn) -> None:
        """Queue fn for the executor thread with the pages pinned until it has run."""
        pages.pin(ids)
        result = batcher.call(fn)
        result.on_done(lambda r: (pages.unpin(ids), r.error and log.error("%s: queued page operation failed: %r",
                                                                           me, r.error)))

    def copy(src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        pages.require_readable(me, [src])
        pages.require_writable(me, [dst])
        if src_start + length > page_size or dst_start + length > page_size:
            raise Refused(f"copying {length} slots from {src_start} to {dst_start} runs past a page of {page_size}")
        return on_executor((src, dst), lambda ex: ex.copy_slots(src, dst, src_start, dst_start, length))

    def mask(page: int, masked: list[bool]) -> None:
        pages.require_writable(me, [page])
        if len(masked) != page_size:
            raise Refused(f"the slot mask has {len(masked)} entries; a page has {page_size} slots")
        return on_executor((page,), lambda ex: ex.mask_slots(page, masked))

    def export(name: str, ids: list[int], meta: str, persistent: bool) -> None:
        if len(meta.encode()) > s.limits.max_message_bytes:
            raise Refused(f"the export's description exceeds the message-size limit of {s.limits.max_message_bytes}")
        pages.export(me, name, ids, meta, persistent)

    return {
        "allocate": sync(allocate),
        "free": sync(free),
        "copy": sync(copy),
        "mask": sync(mask),
        "export-pages": sync(export),
        "import-pages": sync(lambda name: pages.import_(me, name)),
        "unexport": sync(lambda name: pages.unexport(me, name)),
        "list-exports": raw(lambda prefix: pages.list_exports(prefix)),
    }
