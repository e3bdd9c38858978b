"""Paged KV storage: per layer `[num_pages, 2, page_size, num_kv_heads, head_dim]`, and a slot mask.

Addressing: a (page, slot) pair is a row of the flattened layer view
`[num_pages * 2 * page_size, num_kv_heads, head_dim]`; keys of page p start at row
`2 * p * page_size`, values at `(2 * p + 1) * page_size`.
"""
from __future__ import annotations

import numpy as np
import torch

from workers.errors import InvalidRequestError
from workers.model_config import ModelConfig


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * page_size * config.num_kv_heads * config.head_dim * elem


DEFAULT_KV_BUDGET = 1 << 30  # bytes of KV cache when neither num_pages nor a budget is given


def pages_in_budget(one_page_bytes: int, budget_bytes: int) -> int:
    """How many pages of `one_page_bytes` a KV budget holds; ValueError when not one."""
    n = budget_bytes // one_page_bytes
    if n < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds no page of {one_page_bytes} bytes; raise it")
    return int(n)


def pages_for_budget(config: ModelConfig, page_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return pages_in_budget(page_bytes(config, page_size, dtype), budget_bytes)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device):
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages, 2, page_size, config.num_kv_heads, config.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        # True where a slot is masked out: no query sees it. Kept on the host: attention plans
        # are built there, so reading it never synchronizes with the device
        self.slot_masked = np.zeros((num_pages, page_size), dtype=bool)
        # every page operation below goes through these: (keys, values) of each layer, [num_pages, page_size,
        # num_kv_heads, head_dim] views; `over` builds a cache whose parts view another layout
        self.parts = [(t[:, 0], t[:, 1]) for t in self.layers]

    @classmethod
    def over(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], page_size: int) -> PagedKVCache:
        """A cache over tensors someone else allocated (vLLM's KV cache): per layer, views of its keys and
        its values as [num_pages, page_size, num_kv_heads, head_dim], of any strides. Every method but
        `flat` works on it, and read_pages gives the same bytes as for our own layout."""
        cache = cls.__new__(cls)
        cache.num_pages, cache.page_size, cache.parts, cache.layers = parts[0][0].shape[0], page_size, parts, []
        cache.slot_masked = np.zeros((cache.num_pages, page_size), dtype=bool)
        return cache

    def flat(self, layer: int) -> torch.Tensor:
        """[num_pages * 2 * page_size, num_kv_heads, head_dim] view of one layer."""
        t = self.layers[layer]
        return t.view(-1, t.shape[-2], t.shape[-1])

    def key_rows(self, pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Flat row of the key at (pages[i], slots[i]); the value row is this + page_size."""
        return pages * (2 * self.page_size) + slots

    def _check_range(self, page: int, start: int, length: int, what: str) -> None:
        if not 0 <= page < self.num_pages:
            raise InvalidRequestError(f"{what} page {page} is out of range [0, {self.num_pages})")
        if length < 0 or start < 0 or start + length > self.page_size:
            raise InvalidRequestError(
                f"{what} slots [{start}, {start + length}) do not fit a page of {self.page_size}")

    def copy_slots(self, src_page: int, dst_page: int, src_start: int, dst_start: int, length: int) -> None:
        """Copy `length` token slots (keys, values and mask bits) between pages, in every layer."""
        self._check_range(src_page, src_start, length, "source")
        self._check_range(dst_page, dst_start, length, "destination")
        for part in (x for kv in self.parts for x in kv):
            part[dst_page, dst_start:dst_start + length] = part[src_page, src_start:src_start + length].clone()
        self.slot_masked[dst_page, dst_start:dst_start + length] = \
            self.slot_masked[src_page, src_start:src_start + length].copy()

    def page_record_bytes(self) -> int:
        """Bytes read_pages gives per page: keys and values of every layer, then the slot mask."""
        k = self.parts[0][0]
        return len(self.parts) * 2 * k[0].numel() * k.element_size() + self.page_size

    def read_pages(self, pages: list[int]) -> bytes:
        """Pages as one buffer: per layer the [len(pages), 2, page_size, heads, dim] block, raw, then
        the slot masks; only an executor with the same model, dtype and page size can read it."""
        for p in pages:
            self._check_range(p, 0, self.page_size, "read")
        index = torch.as_tensor(pages, dtype=torch.long, device=self.parts[0][0].device)
        blocks = [torch.stack([k.index_select(0, index), v.index_select(0, index)], dim=1) for k, v in self.parts]
        data = [b.contiguous().cpu().view(torch.uint8).numpy().tobytes() for b in blocks]
        return b"".join(data) + self.slot_masked[pages].astype(np.uint8).tobytes()

    def write_pages(self, pages: list[int], data: bytes) -> None:
        """Overwrite pages with a read_pages buffer of as many pages (same model, dtype, page size)."""
        for p in pages:
            self._check_range(p, 0, self.page_size, "written")
        expected = len(pages) * self.page_record_bytes()
        if len(data) != expected:
            raise InvalidRequestError(f"page data has {len(data)} bytes; {len(pages)} pages of this model, dtype and "
                                      f"page size take {expected}: it comes from a different model or dtype")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        index = torch.as_tensor(pages, dtype=torch.long, device=self.parts[0][0].device)
        offset = 0
        for k, v in self.parts:
            size = len(pages) * 2 * k[0].numel() * k.element_size()
            block = raw[offset:offset + size].view(k.dtype).view(len(pages), 2, *k.shape[1:]).to(k.device)
            k.index_copy_(0, index, block[:, 0])
            v.index_copy_(0, index, block[:, 1])
            offset += size
        self.slot_masked[pages] = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(len(pages), -1) != 0

    def set_slot_mask(self, page: int, masked: list[bool]) -> None:
        """Mask (True) or unmask (False) each slot of a page for all later attention."""
        if len(masked) != self.page_size:
            raise InvalidRequestError(f"slot mask has {len(masked)} entries; a page has {self.page_size} slots")
        self._check_range(page, 0, self.page_size, "masked")
        self.slot_masked[page] = np.asarray(masked, dtype=bool)

    def reset_pages(self, pages: list[int]) -> None:
        """Clear the slot masks of pages being handed out anew."""
        self.slot_masked[pages] = False
