"""kv: allocate, free, copy, mask, and sharing pages under names (checked by the worker)."""
from __future__ import annotations

from cluster.runtime.imports._common import raw, sync, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused


def imports(s: InferletSession) -> dict:
    worker, me = s.services.worker, s.instance_id

    def export(name: str, ids: list[int], meta: str, persistent: bool) -> None:
        if len(meta.encode()) > s.limits.max_message_bytes:
            raise Refused(f"the export's description exceeds the message-size limit of {s.limits.max_message_bytes}")
        worker.export(me, name, ids, meta, persistent)

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
    }
