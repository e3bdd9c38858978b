"""The inference layer: model loading, the paged-KV executor contract, and its torch implementation."""
from workers.errors import (InvalidRequestError, ModelLoadError, OutOfPagesError, PageStateError,
                            UnsupportedModelError, WorkerError)
from workers.executor import Executor, ModelInfo
from workers.model_loader import LoadedModel, load_model
from workers.step_types import ForwardRequest, OutputResult, Sampler, StepBatch, StepOutput, pack_batch
from workers.torch_executor import TorchExecutor

__all__ = [
    "Executor", "ModelInfo", "TorchExecutor", "LoadedModel", "load_model",
    "ForwardRequest", "OutputResult", "Sampler", "StepBatch", "StepOutput", "pack_batch",
    "WorkerError", "InvalidRequestError", "ModelLoadError", "OutOfPagesError", "PageStateError",
    "UnsupportedModelError",
]
