"""Who holds which KV pages of one executor, and what is exported under which name.

Pages are reference-counted. A reference is held by the inferlet that allocated a page, by
each inferlet that imported it, by a persistent export, and by every forward pass or copy
in flight that reads or writes it ("pins"). A page goes back to the executor when its last
reference goes, so an inferlet freeing a page under its own outstanding pass, or an
exporter ending while importers still read, never pulls a page from under a running step.

Writes (a pass's new tokens, a copy's destination, a mask) are allowed only on pages the
inferlet allocated and has not exported: shared pages are read-only for everyone, so one
inferlet can never change what another attends to.

The prefix cache (cluster.worker.prefix_cache) holds one more reference on each page offered
to it. Cached pages nobody else holds are evicted, oldest use first, when the cache is over its
budget or an allocation finds too few free pages: the cache never makes an allocation fail.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

from cluster import metrics
from cluster.errors import InferletError
from cluster.worker.prefix_cache import PrefixCache
from workers.executor import Executor


class PageRefused(InferletError):
    """A page operation is not allowed: ownership, quota, names. The message says which."""


@dataclass
class Export:
    pages: tuple[int, ...]
    meta: str  # the exporter's description for importers (e.g. the tokens the pages hold)
    owner: str  # instance id of the exporter
    persistent: bool  # outlives its exporter until unexported


MAX_EXPORT_NAME_BYTES = 256


class PageRegistry:
    def __init__(self, executor: Executor, max_persistent_pages: int | None = None,
                 max_cached_pages: int | None = None):
        self.executor = executor
        # pages held by persistent exports at once, so exiting inferlets cannot hoard the cache
        self.max_persistent_pages = (executor.info.num_pages // 2 if max_persistent_pages is None
                                     else max_persistent_pages)
        self.cache = PrefixCache(executor.info.num_pages // 2 if max_cached_pages is None else max_cached_pages)
        self._lock = threading.Lock()
        self._refs: collections.Counter[int] = collections.Counter()
        self._held: dict[str, collections.Counter[int]] = {}  # holder -> page -> references it holds
        self._allocated_by: dict[int, str] = {}  # page -> the inferlet that allocated it
        self._shared: set[int] = set()  # pages that were ever exported: read-only
        self._exports: dict[str, Export] = {}

    # -- holding pages ---------------------------------------------------------------------------
    def allocate(self, holder: str, count: int, quota: int) -> list[int]:
        with self._lock:
            owned = sum(1 for p in self._held.get(holder, ()) if self._allocated_by.get(p) == holder)
            if owned + count > quota:
                raise PageRefused(f"allocating {count} pages exceeds this inferlet's quota of {quota} "
                                  f"(it holds {owned})")
            short = count - self.executor.num_free_pages
            if short > 0:
                self.executor.free_pages(self._evict(short))  # cached pages nobody holds make room
            pages = self.executor.allocate_pages(count)
            if pages is None:
                raise PageRefused(f"the worker has fewer than {count} free KV pages; free some or retry later")
            held = self._held.setdefault(holder, collections.Counter())
            for p in pages:
                self._refs[p] += 1
                held[p] += 1
                self._allocated_by[p] = holder
            return pages

    def free(self, holder: str, pages: list[int]) -> None:
        """Drop one of the holder's references to each page (all or nothing)."""
        with self._lock:
            need = collections.Counter(pages)
            held = self._held.get(holder, collections.Counter())
            missing = [p for p, n in need.items() if held[p] < n]
            if missing:
                raise PageRefused(f"page {missing[0]} is not held by this inferlet (or is listed more often "
                                  f"than it holds it)")
            for p, n in need.items():
                held[p] -= n
                if not held[p]:
                    del held[p]
            released = self._unref(pages)
        self._give_back(released)

    def require_readable(self, holder: str, pages) -> None:
        held = self._held.get(holder, {})
        for p in pages:
            if p not in held:
                raise PageRefused(f"page {p} is not held by this inferlet")

    def require_writable(self, holder: str, pages) -> None:
        self.require_readable(holder, pages)
        for p in pages:
            if self._allocated_by.get(p) != holder or p in self._shared:
                raise PageRefused(f"page {p} is shared (exported or imported) and read-only; "
                                  f"copy its slots into a page of your own to change them")

    def pin(self, pages) -> None:
        """Hold pages for an operation in flight."""
        with self._lock:
            for p in pages:
                self._refs[p] += 1

    def unpin(self, pages) -> None:
        with self._lock:
            released = self._unref(pages)
        self._give_back(released)

    # -- exports ---------------------------------------------------------------------------------
    def export(self, holder: str, name: str, pages: list[int], meta: str, persistent: bool) -> None:
        if not name or len(name.encode()) > MAX_EXPORT_NAME_BYTES:
            raise PageRefused(f"an export name must have 1 to {MAX_EXPORT_NAME_BYTES} bytes")
        self.require_readable(holder, pages)
        with self._lock:
            if name in self._exports:
                raise PageRefused(f"the name {name!r} is already exported; unexport it first or pick another")
            if persistent:
                in_use = sum(len(e.pages) for e in self._exports.values() if e.persistent)
                if in_use + len(pages) > self.max_persistent_pages:
                    raise PageRefused(f"persistent exports would hold {in_use + len(pages)} pages; this host "
                                      f"allows {self.max_persistent_pages}. Unexport some first")
            self._exports[name] = Export(tuple(pages), meta, holder, persistent)
            self._shared.update(pages)
            for p in pages:
                self._refs[p] += 1  # the export's own reference

    def import_(self, holder: str, name: str) -> tuple[list[int], str]:
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                raise PageRefused(f"nothing is exported under {name!r}")
            held = self._held.setdefault(holder, collections.Counter())
            for p in export.pages:
                self._refs[p] += 1
                held[p] += 1
            return list(export.pages), export.meta

    def unexport(self, holder: str, name: str) -> None:
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                raise PageRefused(f"nothing is exported under {name!r}")
            if not export.persistent and export.owner != holder:
                raise PageRefused(f"{name!r} was exported by another inferlet; only it can unexport it")
            released = self._end_export(name)
        self._give_back(released)

    def list_exports(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._exports if n.startswith(prefix))

    # -- the prefix cache ------------------------------------------------------------------------
    def cache_lookup(self, holder: str, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest run of `hashes` from the first; the holder now holds
        them (read-only) until it frees them."""
        with self._lock:
            pages = self.cache.longest_prefix(hashes)
            held = self._held.setdefault(holder, collections.Counter())
            for p in pages:
                self._refs[p] += 1
                held[p] += 1
        metrics.PREFIX_HITS.inc(len(pages))
        metrics.PREFIX_MISSES.inc(len(hashes) - len(pages))
        return pages

    def cache_store(self, holder: str, hashes: list[bytes], pages: list[int]) -> int:
        """Offer the holder's full pages under their hashes (in order: page i holds block i);
        returns how many the cache took. Taken pages become read-only. Blocks already cached are
        only marked used; past the budget, the oldest unheld pages make room or the rest is not taken."""
        if len(hashes) != len(pages):
            raise PageRefused(f"{len(hashes)} block hashes for {len(pages)} pages")
        self.require_readable(holder, pages)
        taken, released = 0, []
        with self._lock:
            for h, p in zip(hashes, pages):
                if h in self.cache:
                    self.cache.touch(h)
                    continue
                if self.cache.holds_page(p):
                    continue  # cached under another block (its tokens differ): keep the first
                if len(self.cache) >= self.cache.max_pages:
                    released += self._evict(1)
                    if len(self.cache) >= self.cache.max_pages:
                        break
                self.cache.add(h, p)
                self._refs[p] += 1
                self._shared.add(p)
                taken += 1
        self._give_back(released)
        return taken

    def num_exported(self) -> int:
        """Pages some export names (an export's pages may also be held by inferlets)."""
        with self._lock:
            return len({p for e in self._exports.values() for p in e.pages})

    def num_cached(self) -> int:
        with self._lock:
            return len(self.cache)

    def drop_cache(self) -> None:
        """Give back every cached page nobody else holds (the worker is closing)."""
        with self._lock:
            released = self._evict(len(self.cache))
        self._give_back(released)

    # -- ending ----------------------------------------------------------------------------------
    def drop_holder(self, holder: str) -> None:
        """The inferlet ended: release its references and its non-persistent exports."""
        with self._lock:
            held = self._held.pop(holder, collections.Counter())
            released = self._unref(list(held.elements()))
            for name in [n for n, e in self._exports.items() if e.owner == holder and not e.persistent]:
                released += self._end_export(name)
        self._give_back(released)

    def drop_exports(self) -> list[str]:
        """End every export (the names' directory forgot them); returns their names."""
        with self._lock:
            names = list(self._exports)
            released = [p for name in names for p in self._end_export(name)]
        self._give_back(released)
        return names

    def holding(self, holder: str) -> tuple[list[list], list[str]]:
        """What the holder has here, for moving it to another worker: [page, references, writable]
        for each page it holds, by page; and the names of its non-persistent exports."""
        with self._lock:
            held = self._held.get(holder, collections.Counter())
            pages = [[p, n, self._allocated_by.get(p) == holder and p not in self._shared]
                     for p, n in sorted(held.items())]
            exports = sorted(n for n, e in self._exports.items() if e.owner == holder and not e.persistent)
            return pages, exports

    def num_held(self, holder: str) -> int:
        with self._lock:
            return len(self._held.get(holder, ()))

    def check_idle(self) -> None:
        """With nothing running: only persistent exports and the prefix cache hold pages, and the
        executor agrees."""
        with self._lock:
            holders = {h: len(c) for h, c in self._held.items() if c}
            kept = {p for e in self._exports.values() if e.persistent for p in e.pages} | self.cache.pages
            live = set(self._refs)
        if holders:
            raise PageRefused(f"pages still held by ended inferlets: {holders}")
        if live != kept:
            raise PageRefused(f"pages referenced without a holder: {sorted(live - kept)[:8]}")
        self.executor.check_idle_invariant()

    # -- internals (under the lock) ---------------------------------------------------------------
    def _end_export(self, name: str) -> list[int]:
        export = self._exports.pop(name)
        return self._unref(export.pages)

    def _evict(self, count: int) -> list[int]:
        """Drop up to `count` cached pages that only the cache holds, oldest use first; the pages
        to give back to the executor."""
        released = []
        for page in self.cache.oldest(lambda p: self._refs[p] == 1):
            if len(released) == count:
                break
            self.cache.remove(page)
            released += self._unref([page])
        return released

    def _unref(self, pages) -> list[int]:
        released = []
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                del self._refs[p]
                self._allocated_by.pop(p, None)
                self._shared.discard(p)
                released.append(p)
        return released

    def _give_back(self, pages: list[int]) -> None:
        if pages:
            self.executor.free_pages(pages)
