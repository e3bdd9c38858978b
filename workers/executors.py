"""Which executor runs a worker's model: "torch" (ours, the default) or "vllm" (workers/vllm_exec,
needs the vllm extra). Layers above workers/ build executors here only."""
from __future__ import annotations

from workers.executor import Executor
from workers.model_loader import LoadedModel
from workers.progress import ProgressFn

EXECUTORS = ("torch", "vllm")


def quant_refusal(kind: str, quant: str) -> str | None:
    """Why `quant` cannot go with this executor (the end of a sentence naming the option), or None.
    Only the torch executor quantizes weights itself (workers/quant)."""
    if kind == "torch" or quant == "none":
        return None
    return (f"is for the torch executor; the {kind} executor reads quantized checkpoints (GPTQ, AWQ, "
            "compressed-tensors, ...) from the model directory itself")


def _executor_class(kind: str):
    if kind == "torch":
        from workers.torch_executor import TorchExecutor
        return TorchExecutor
    if kind == "vllm":
        from workers.vllm_exec.executor import VllmExecutor
        return VllmExecutor
    raise ValueError(f"executor {kind!r} is not one of {list(EXECUTORS)}")


def load_executor(kind: str = "torch", model: str | None = None, progress: ProgressFn | None = None,
                  **kwargs) -> Executor:
    """Load `model` (see workers.model_loader.resolve) into an executor of this kind."""
    return _executor_class(kind).load(model, progress, **kwargs)


def executor_from_loaded(kind: str, model: LoadedModel, **kwargs) -> Executor:
    """An executor of this kind over a model our loader already read (tests, benchmarks)."""
    cls = _executor_class(kind)
    return cls(model, **kwargs) if kind == "torch" else cls.from_loaded(model, **kwargs)
