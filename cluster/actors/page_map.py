"""The page ids a moved inferlet knows, and the pages that hold them on the worker it runs on now.

An inferlet names its KV pages by the ids its worker gave it. When it moves to another worker
(cluster.actors.inferlet_move), its pages are copied into pages with other ids there; the inferlet
keeps using the old ones. PageMap translates each call's ids (virtual) into the new worker's
(physical) and the ids in each answer back:

- A page copied by the move keeps its old id. A copy of a page the inferlet could only read there
  (imported, or exported by it) stays read-only here (`require_writable`), though on the new worker it
  is the inferlet's own page; and a page it held several references to (imported twice) counts as
  many here (`to_free` drops the extra ones without asking the worker).
- A page the new worker gives it later (allocate, import, the prefix cache) is named by its own id
  unless the inferlet already uses that id for a copied page; then by a fresh id above any page id.
- An id that maps to nothing is refused here with the worker's own words, so a call never reaches
  a page the inferlet does not know under that id.

Not thread-safe on its own: ClusterWorker calls it under its lock.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterable

from cluster.worker.page_registry import PageRefused

FRESH_IDS_FROM = 1 << 30  # above any worker's page ids: ids for new pages whose own id is taken


class PageMap:
    def __init__(self):
        self._physical: dict[int, int] = {}  # virtual -> physical
        self._virtual: dict[int, int] = {}  # physical -> virtual
        self._copies: set[int] = set()  # virtual ids of the pages the move copied, until freed
        self._read_only: set[int] = set()  # of those, the ones the inferlet could only read before
        self._extra: collections.Counter[int] = collections.Counter()  # references beyond the worker's one
        self._fresh = itertools.count(FRESH_IDS_FROM)

    def bind_copy(self, virtual: int, physical: int, references: int, writable: bool) -> None:
        """The move copied page `virtual` (held `references` times) into `physical`."""
        self._bind(virtual, physical)
        self._copies.add(virtual)
        if not writable:
            self._read_only.add(virtual)
        if references > 1:
            self._extra[virtual] = references - 1

    def physical(self, pages: Iterable[int]) -> list[int]:
        """The worker's ids for the inferlet's; PageRefused for an id it does not hold."""
        try:
            return [self._physical[int(p)] for p in pages]
        except KeyError as e:
            raise PageRefused(f"page {e.args[0]} is not held by this inferlet") from None

    def virtual(self, pages: Iterable[int]) -> list[int]:
        """The inferlet's ids for pages the worker just gave it, naming new ones."""
        out = []
        for p in pages:
            p = int(p)
            v = self._virtual.get(p)
            if v is None:
                v = p
                while v in self._physical:  # a copy's id (from an earlier map's fresh ids too)
                    v = next(self._fresh)
                self._bind(v, p)
            out.append(v)
        return out

    def require_writable(self, pages: Iterable[int]) -> None:
        for p in pages:
            if int(p) in self._read_only:
                raise PageRefused(f"page {p} is shared (exported or imported) and read-only; "
                                  f"copy its slots into a page of your own to change them")

    def to_free(self, pages: list[int]) -> list[int]:
        """The worker's pages to free for the inferlet's `pages`: a copied page's extra references
        go first, here. Changes nothing: call `freed` once the worker agreed."""
        extra = collections.Counter(self._extra)
        out = []
        for v in self._checked(pages):
            if extra[v] > 0:
                extra[v] -= 1
            else:
                out.append(self._physical[v])
        return out

    def freed(self, pages: list[int]) -> None:
        """The worker freed `to_free(pages)`: a copied page whose last reference went is forgotten (its
        id, and whether it was read-only, no longer apply to what the worker gives under it later)."""
        for v in self._checked(pages):
            if self._extra[v] > 0:
                self._extra[v] -= 1
                if not self._extra[v]:
                    del self._extra[v]
            elif v in self._copies:
                self._copies.discard(v)
                self._read_only.discard(v)
                del self._virtual[self._physical.pop(v)]

    def carried(self, physical: int, references: int, writable: bool) -> tuple[int, int, bool]:
        """For the next move: the inferlet's id, references and writability of a page it holds here
        (the worker's count and flag for `physical`, with this map's own for a copied page)."""
        v = self.virtual([physical])[0]
        return v, references + self._extra[v], writable and v not in self._read_only

    def _checked(self, pages: list[int]) -> list[int]:
        pages = [int(p) for p in pages]
        self.physical(pages)  # raises for an unknown id
        return pages

    def _bind(self, virtual: int, physical: int) -> None:
        self._physical[virtual] = physical
        self._virtual[physical] = virtual
