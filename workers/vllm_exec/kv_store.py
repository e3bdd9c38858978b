"""vLLM's KV cache with our page ids as its block ids, and our view of it.

The attention backend decides the tensor layout; we allocate one tensor per layer in that layout,
bind it to the layer as vLLM's model runner would, and keep strided views of its keys and values
as [num_pages, page_size, kv_heads, head_dim] (no copy). Over those views a PagedKVCache does page
copies, reads, writes and slot masks as on the torch executor, and read_pages gives the same bytes:
pages move between a torch and a vLLM worker of one model and dtype.

A probe at load writes known keys and values through the backend's own cache update and reads
them back through the views, so a layout this file does not know fails at load, not in answers.
"""
from __future__ import annotations

import torch

from workers.errors import ModelLoadError
from workers.kv_cache import PagedKVCache
from workers.vllm_exec.model_setup import VllmModel


def _allocate(backend, num_pages: int, page_size: int, heads: int, dim: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the tensor vLLM's backend reads, our keys view, our values view)."""
    if backend.get_name() == "CPU_ATTN":
        # [blocks, heads, block_size, 2 * dim]; per block and head the backend keeps the keys transposed
        # ([dim, block_size], as its kernels read them), then the values ([block_size, dim])
        t = torch.zeros(num_pages, heads, page_size, 2 * dim, dtype=dtype, device=device)
        halves = t.view(num_pages, heads, 2, page_size * dim)
        keys = halves[:, :, 0].view(num_pages, heads, dim, page_size).permute(0, 3, 1, 2)
        values = halves[:, :, 1].view(num_pages, heads, page_size, dim).permute(0, 2, 1, 3)
        return t, keys, values
    shape_of = getattr(backend, "get_kv_cache_shape", None)
    shape = tuple(shape_of(num_pages, page_size, heads, dim)) if shape_of else None
    if shape == (2, num_pages, page_size, heads, dim):  # FlashAttention's NHD layout
        t = torch.zeros(shape, dtype=dtype, device=device)
        return t, t[0], t[1]
    raise ModelLoadError(f"vLLM chose the {backend.get_name()} attention backend, whose KV layout {shape} the "
                         "vLLM executor does not map yet; pick another with VLLM_ATTENTION_BACKEND=FLASH_ATTN")


def _probe(layer, tensor: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Write random keys and values to page 0 through the backend; our views must read them back."""
    n, heads, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, heads, dim, generator=gen).to(keys.dtype).to(keys.device)
    v = torch.randn(n, heads, dim, generator=gen).to(keys.dtype).to(keys.device)
    slots = torch.arange(n, device=keys.device)
    if hasattr(layer.impl, "do_kv_cache_update"):
        layer.impl.do_kv_cache_update(layer, k, v, tensor, slots)
    else:
        raise ModelLoadError(f"{type(layer.impl).__name__} has no separate KV update; the vLLM executor "
                             "cannot check its layout")
    ok = torch.equal(keys[0], k) and torch.equal(values[0], v)
    keys[0].zero_()
    values[0].zero_()
    if not ok:
        raise ModelLoadError(f"vLLM's {layer.attn_backend.get_name()} backend (ISA {getattr(layer, 'isa', '?')}) "
                             "stores KV in a layout the vLLM executor does not read; use --executor torch")


def bind_kv_cache(vm: VllmModel, num_pages: int, page_size: int) -> PagedKVCache:
    """Allocate, check and bind every attention layer's cache; return our view of them all."""
    device = vm.config.device_config.device
    parts = []
    for i, layer in enumerate(vm.layers.values()):
        tensor, keys, values = _allocate(layer.attn_backend, num_pages, page_size, vm.num_kv_heads, vm.head_size,
                                         vm.dtype, device)
        if i == 0:
            _probe(layer, tensor, keys, values)
        layer.kv_cache = tensor
        parts.append((keys, values))
    return PagedKVCache.over(parts, page_size)
