"""kv: allocate, free, copy, mask, and sharing pages under names (checked by the worker)."""
from __future__ import annotations

from cluster.runtime.imports._common import raw, sync, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused
from cluster.worker.prefix_hashes import block_hashes


def imports(s: InferletSession) -> dict:
    worker, me = s.services.worker, s.instance_id

    def export(name: str, ids: list[int], meta: str, persistent: bool) -> None:
        if len(meta.encode()) > s.limits.max_message_bytes:
            raise Refused(f"the export's description exceeds the message-size limit of {s.limits.max_message_bytes}")
        worker.export(me, name, ids, meta, persistent)

    info = s.services.info
    cache_key = f"{info.name}\0{s.cache_scope}"  # the model, the program and the tenant

    def hashes(tokens: list[int]) -> list[bytes]:
        if len(tokens) > info.max_position:
            raise Refused(f"{len(tokens)} tokens are more than a sequence holds ({info.max_position})")
        return list(block_hashes(tokens, info.page_size, cache_key))

    def cache_lookup(tokens: list[int]) -> tuple[list[int], int]:
        pages = worker.cache_lookup(me, hashes(tokens))
        return pages, len(pages) * info.page_size

    def cache_store(tokens: list[int], pages: list[int]) -> int:
        if len(pages) != len(tokens) // info.page_size:
            raise Refused(f"{len(tokens)} tokens fill {len(tokens) // info.page_size} whole pages of "
                          f"{info.page_size}; {len(pages)} pages were given")
        return worker.cache_store(me, hashes(tokens), pages)

    def import_pages(name: str) -> Pending:
        pending = worker.import_later(me, name)  # a ClusterWorker may copy the pages from another worker first
        # a copy that ends after its inferlet did allocated pages to a holder already released: release it again
        pending.on_done(lambda _: s.ended and worker.release(me))
        return pending

    return {
        "allocate": sync(lambda count: worker.allocate(me, count, s.limits.max_pages)),
        "free": sync(lambda ids: worker.free(me, ids)),
        "copy": sync(lambda src, dst, src_start, dst_start, length:
                     worker.copy(me, src, dst, src_start, dst_start, length)),
        "mask": sync(lambda page, masked: worker.mask(me, page, masked)),
        "export-pages": sync(export),
        "import-pages": waiting(s, import_pages),
        "unexport": sync(lambda name: worker.unexport(me, name)),
        "list-exports": raw(lambda prefix: worker.list_exports(prefix)),
        "cache-lookup": sync(cache_lookup),
        "cache-store": sync(cache_store),
    }
