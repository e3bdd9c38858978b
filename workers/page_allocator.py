"""The free list of KV pages. Callers get page ids; ownership and sharing live above this layer."""
from __future__ import annotations

import threading

from workers.errors import PageStateError


class PageAllocator:
    """Hands out page ids in [0, num_pages). `allocate` returns None when too few are free:
    the caller decides whether to wait, preempt or fail. Thread-safe: the host hands pages
    out while the executor thread runs a step over others."""

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low ids are handed out first
        self._allocated: set[int] = set()
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        with self._lock:
            if n > len(self._free):
                return None
            pages = [self._free.pop() for _ in range(n)]
            self._allocated.update(pages)
            return pages

    def free(self, pages: list[int]) -> None:
        """Return pages to the free list; all or nothing if any id is not allocated."""
        with self._lock:
            unknown = [p for p in pages if p not in self._allocated]
            if unknown or len(set(pages)) != len(pages):
                raise PageStateError(f"cannot free pages that are not allocated (or listed twice): {unknown or pages}")
            self._allocated.difference_update(pages)
            self._free.extend(pages)

    def is_allocated(self, page: int) -> bool:
        return page in self._allocated

    def check_invariant(self) -> None:
        """free + allocated == total, with no page in both: a leak or double free breaks this."""
        with self._lock:
            broken = len(self._free) + len(self._allocated) != self.num_pages or self._allocated.intersection(self._free)
        if broken:
            raise PageStateError(
                f"page accounting broken: {len(self._free)} free + {len(self._allocated)} allocated != {self.num_pages}")
