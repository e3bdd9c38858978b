"""The default executor: our Llama-family model code over a paged KV cache, in plain PyTorch."""
from __future__ import annotations

import numpy as np
import torch

from workers.attention import build_plan
from workers.executor import ModelInfo
from workers.kv_cache import DEFAULT_KV_BUDGET, PagedKVCache, pages_for_budget
from workers.llama_model import LlamaModel
from workers.model_loader import LoadedModel, load_model
from workers.paged_executor import PagedExecutor
from workers.quant.model_weights import quant_weights
from workers.progress import ProgressFn
from workers.step_types import StepBatch
from workers.tokenizer import Tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUANTS = ("none", "int8", "int4")  # weight formats of the linear layers: see workers/quant


class TorchExecutor(PagedExecutor):
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
        self._setup_pages(
            ModelInfo(name=config.name, architecture=config.architecture, vocab_size=config.vocab_size,
                      page_size=page_size, num_pages=num_pages, max_position=config.max_position,
                      stop_token_ids=model.tokenizer.stop_token_ids, dtype=dtype, device=str(self._device),
                      quant=quant),
            PagedKVCache(config, num_pages, page_size, torch_dtype, self._device), Tokenizer(model.tokenizer),
            self._device, seed, config.sliding_window)

    @classmethod
    def load(cls, model: str | None = None, progress: ProgressFn | None = None, **kwargs) -> TorchExecutor:
        """Load a model (see workers.model_loader.resolve for what `model` may be) and build an executor."""
        return cls(load_model(model, progress), **kwargs)

    def _logits(self, batch: StepBatch) -> torch.Tensor:
        plan = build_plan(batch, self.kv, self._device)
        to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self._device)
        return self.model.forward(to_device(batch.token_ids), to_device(batch.position_ids), plan, self.kv,
                                  to_device(batch.output_token_indices))
