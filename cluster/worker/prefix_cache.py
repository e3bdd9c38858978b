"""Full KV pages kept for reuse after the inferlets that computed them end, keyed by the chained
hash of the tokens they hold (cluster.worker.prefix_hashes), as vLLM's automatic prefix caching.

This is the bookkeeping only: which hash names which page, in least-recently-used order. The
page registry holds one reference per cached page and decides what to evict (pages nobody else
holds, oldest first) when the cache is over its budget or allocation runs short. Hash keys start
from a cache key naming the model, the program and the tenant, so one program's or one tenant's
pages are never found by another.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence


class PrefixCache:
    def __init__(self, max_pages: int):
        self.max_pages = max_pages
        self._page_of: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # oldest use first
        self._hash_of: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._page_of)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._page_of

    def holds_page(self, page: int) -> bool:
        return page in self._hash_of

    @property
    def pages(self) -> set[int]:
        return set(self._hash_of)

    def longest_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest run of `hashes`, from the first, that is cached; each found
        page counts as used now."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            self._page_of.move_to_end(h)
            pages.append(page)
        return pages

    def touch(self, block_hash: bytes) -> None:
        self._page_of.move_to_end(block_hash)

    def add(self, block_hash: bytes, page: int) -> None:
        if block_hash in self._page_of or page in self._hash_of:
            raise ValueError(f"page {page} or its hash is cached already")
        self._page_of[block_hash] = page
        self._hash_of[page] = block_hash

    def oldest(self, evictable: Callable[[int], bool]) -> Iterator[int]:
        """Cached pages that `evictable` allows, least recently used first (a snapshot)."""
        return iter([p for p in self._page_of.values() if evictable(p)])

    def remove(self, page: int) -> None:
        del self._page_of[self._hash_of.pop(page)]
