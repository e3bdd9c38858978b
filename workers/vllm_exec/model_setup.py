"""Builds one vLLM model in this process: its config, the one-rank distributed state, the weights.

vLLM's engine normally does this in worker processes; we do the same steps in-process so the
model's forward runs on our batcher thread. The steps that reach into vLLM's internals are all
here, so a vLLM upgrade breaks one file.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from workers.errors import ModelLoadError

VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            "the vLLM executor needs vLLM: run `make setup-vllm` and use .venv-vllm/bin/pie "
            f"(pip install 'pie-cluster[vllm]' on CPU; the CUDA `vllm` build on GPUs) ({e})") from e
    return vllm


@dataclass
class VllmModel:
    model: torch.nn.Module  # vLLM's *ForCausalLM: forward(input_ids, positions) and compute_logits(hidden)
    config: object  # vllm.config.VllmConfig
    layers: dict  # layer name -> vllm Attention module, in model order
    builder: object  # the attention backend's metadata builder
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(config) -> None:
    """A world of one rank (tensor and pipeline parallel size 1), once per process."""
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        backend = "gloo" if config.device_config.device.type == "cpu" else "nccl"
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{_free_port()}", 0, backend)
    ensure_model_parallel_initialized(1, 1)


def load_vllm_model(model_dir: str, dtype: str, page_size: int, max_model_len: int | None, seed: int) -> VllmModel:
    """Load a Hugging Face model directory with vLLM (any architecture and quantization it supports)."""
    import_vllm()
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.model_loader import get_model
    from vllm.platforms import current_platform

    try:
        config = EngineArgs(model=model_dir, dtype=VLLM_DTYPES[dtype], enforce_eager=True, skip_tokenizer_init=True,
                            block_size=page_size, max_model_len=max_model_len, seed=seed).create_engine_config()
    except Exception as e:  # vLLM's own validation: unknown architecture, bad block size, ...
        raise ModelLoadError(f"vLLM cannot serve {model_dir} ({type(e).__name__}: {e})") from e
    if current_platform.is_cpu():
        # vLLM's CPU model runner makes torch.accelerator calls no-ops the same way
        from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop
        _set_torch_accelerator_to_noop()
    with set_current_vllm_config(config):
        _init_distributed(config)
        model = get_model(vllm_config=config)
    layers = {name: layer for name, layer in config.compilation_config.static_forward_context.items()
              if isinstance(layer, Attention)}
    if not layers:
        raise ModelLoadError(f"{model_dir}: vLLM built no attention layers; only decoder models are served")
    first = next(iter(layers.values()))
    spec = first.get_kv_cache_spec(config)
    if any(layer.get_kv_cache_spec(config) != spec for layer in layers.values()):
        raise ModelLoadError(f"{model_dir} mixes attention layer kinds (sliding windows, ...); "
                             "the vLLM executor serves models whose layers share one KV format")
    with set_current_vllm_config(config):
        builder = first.attn_backend.get_builder_cls()(spec, list(layers), config, config.device_config.device)
    return VllmModel(model, config, layers, builder, spec.num_kv_heads, spec.head_size, spec.dtype)
