"""The default executor: our Llama-family model code over a paged KV cache, in plain PyTorch."""
from __future__ import annotations

import numpy as np
import torch

from workers.attention import build_plan
from workers.errors import InvalidRequestError
from workers.executor import Executor, ModelInfo
from workers.kv_cache import PagedKVCache, pages_for_budget
from workers.llama_model import LlamaModel
from workers.model_loader import LoadedModel, load_model
from workers.page_allocator import PageAllocator
from workers.quant.model_weights import quant_weights
from workers.progress import ProgressFn
from workers.sampling import sample_outputs
from workers.step_types import StepBatch, StepOutput
from workers.step_validation import StepLimits, validate_batch
from workers.tokenizer import Tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUANTS = ("none", "int8", "int4")  # weight formats of the linear layers: see workers/quant
DEFAULT_KV_BUDGET = 1 << 30  # bytes of KV cache when neither num_pages nor a budget is given


class TorchExecutor(Executor):
    def __init__(self, model: LoadedModel, dtype: str = "bf16", device: str = "cpu", page_size: int = 16,
                 num_pages: int | None = None, kv_budget_bytes: int = DEFAULT_KV_BUDGET, seed: int = 0,
                 quant: str = "none"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if quant not in QUANTS:
            raise ValueError(f"quant {quant!r} is not one of {list(QUANTS)}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self._device = torch.device(device)
        torch_dtype = DTYPES[dtype]
        config = model.config
        self.model = LlamaModel(config, model.weights, torch_dtype, self._device,
                                quant_weights(model, quant, self._device))
        if num_pages is None:
            num_pages = pages_for_budget(config, page_size, torch_dtype, kv_budget_bytes)
        self.kv = PagedKVCache(config, num_pages, page_size, torch_dtype, self._device)
        self.pages = PageAllocator(num_pages)
        self._tokenizer = Tokenizer(model.tokenizer)
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._info = ModelInfo(
            name=config.name, architecture=config.architecture, vocab_size=config.vocab_size,
            page_size=page_size, num_pages=num_pages, max_position=config.max_position,
            stop_token_ids=model.tokenizer.stop_token_ids, dtype=dtype, device=str(self._device),
            quant=quant)
        self._limits = StepLimits(num_pages, page_size, config.vocab_size, config.max_position, config.sliding_window)

    @classmethod
    def load(cls, model: str | None = None, progress: ProgressFn | None = None, **kwargs) -> TorchExecutor:
        """Load a model (see workers.model_loader.resolve for what `model` may be) and build an executor."""
        return cls(load_model(model, progress), **kwargs)

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
        plan = build_plan(batch, self.kv, self._device)
        to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self._device)
        logits = self.model.forward(to_device(batch.token_ids), to_device(batch.position_ids), plan, self.kv,
                                    to_device(batch.output_token_indices))
        positions = batch.position_ids[batch.output_token_indices].tolist()
        return StepOutput(sample_outputs(logits, batch.samplers, positions, self._generator))
