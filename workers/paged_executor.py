"""What every executor over our page allocator shares: page bookkeeping, KV page operations on a
PagedKVCache (or a view of another's cache), validation before the forward, our sampling after it.
Subclasses build the model and the cache and compute logits (`_logits`)."""
from __future__ import annotations

from abc import abstractmethod

import torch

from workers.errors import InvalidRequestError
from workers.executor import Executor, ModelInfo
from workers.kv_cache import PagedKVCache
from workers.page_allocator import PageAllocator
from workers.sampling import sample_outputs
from workers.step_types import StepBatch, StepOutput
from workers.step_validation import StepLimits, validate_batch
from workers.tokenizer import Tokenizer


class PagedExecutor(Executor):
    def _setup_pages(self, info: ModelInfo, kv: PagedKVCache, tokenizer: Tokenizer, device: torch.device,
                     seed: int, sliding_window: int | None) -> None:
        self._info, self.kv, self._tokenizer = info, kv, tokenizer
        self.pages = PageAllocator(info.num_pages)
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._limits = StepLimits(info.num_pages, info.page_size, info.vocab_size, info.max_position, sliding_window)

    @abstractmethod
    def _logits(self, batch: StepBatch) -> torch.Tensor:
        """float32 logits [num_outputs, vocab] at the batch's output positions, after writing its KV."""

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def num_free_pages(self) -> int:
        return self.pages.num_free

    def allocate_pages(self, n: int) -> list[int] | None:
        pages = self.pages.allocate(n)
        if pages:
            self.kv.reset_pages(pages)
        return pages

    def free_pages(self, pages: list[int]) -> None:
        self.pages.free(pages)

    def check_idle_invariant(self) -> None:
        self.pages.check_invariant()

    def copy_slots(self, src_page: int, dst_page: int, src_start: int, dst_start: int, length: int) -> None:
        self._require_allocated([src_page, dst_page])
        self.kv.copy_slots(src_page, dst_page, src_start, dst_start, length)

    def mask_slots(self, page: int, masked: list[bool]) -> None:
        self._require_allocated([page])
        self.kv.set_slot_mask(page, masked)

    def read_pages(self, pages: list[int]) -> bytes:
        self._require_allocated(pages)
        return self.kv.read_pages(pages)

    def write_pages(self, pages: list[int], data: bytes) -> None:
        self._require_allocated(pages)
        self.kv.write_pages(pages, data)

    def _require_allocated(self, pages, request: int | None = None) -> None:
        for p in pages:
            if not self.pages.is_allocated(int(p)):
                raise InvalidRequestError(f"page {int(p)} is not allocated", request)

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> StepOutput:
        validate_batch(batch, self._limits)
        for i in range(batch.num_requests):
            self._require_allocated(set(batch.kv_page_indices[batch.kv_page_indptr[i]:batch.kv_page_indptr[i + 1]]
                                        .tolist()), i)
        logits = self._logits(batch)
        positions = batch.position_ids[batch.output_token_indices].tolist()
        return StepOutput(sample_outputs(logits, batch.samplers, positions, self._generator))
