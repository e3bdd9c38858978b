"""Copying KV pages' contents from one worker to another, over the handler-call service.

An import of a name exported on another worker (cluster_worker.py), an export's move
(kv_migration.py) and a running inferlet's move (inferlet_move.py) all copy this way.
"""
from __future__ import annotations

from cluster.rpc.remote_worker import RemoteWorker

COPY_CHUNK_PAGES = 8  # pages per read / write call when copying across workers (SmolLM2 fp32: 5.9 MB)


def copy_pages(source: RemoteWorker, src_holder: str, src_pages: list[int], dest: RemoteWorker, dst_holder: str,
               dst_pages: list[int]) -> None:
    """Copy pages' contents from one worker to another, COPY_CHUNK_PAGES at a time: read_pages on the
    source (pages `src_holder` holds there), write_pages on the destination (pages `dst_holder` may write).
    Every copy between workers goes this way (see the module's docstring)."""
    for at in range(0, len(src_pages), COPY_CHUNK_PAGES):
        chunk = slice(at, at + COPY_CHUNK_PAGES)
        data = source.wait(source.read_pages(src_holder, src_pages[chunk]))
        dest.wait(dest.write_pages(dst_holder, dst_pages[chunk], data))
