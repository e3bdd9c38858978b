"""The executor contract: the only thing layers above workers/ may depend on.

An executor owns a model and its paged KV cache. Callers allocate pages, describe each
step as a StepBatch (see workers.step_types for the exact semantics) and get a StepOutput
back. Implementations: TorchExecutor (our model code) and VllmExecutor (vLLM's model code and kernels,
workers/vllm_exec), both by name through workers.executors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from workers.step_types import StepBatch, StepOutput
from workers.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    page_size: int  # token slots per KV page
    num_pages: int  # total KV pages of this executor
    max_position: int  # positions are in [0, max_position)
    stop_token_ids: tuple[int, ...]
    dtype: str  # "bf16" or "fp32"
    device: str
    quant: str = "none"  # weight format of the linear layers: "none", "int8" or "int4"
    executor: str = "torch"  # which executor runs the model (workers.executors.EXECUTORS)


class Executor(ABC):
    """One model on one device. Page bookkeeping (allocate_pages, free_pages, num_free_pages) is
    thread-safe; everything else has one caller (the worker's batcher thread)."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer: ...

    @abstractmethod
    def allocate_pages(self, n: int) -> list[int] | None:
        """n fresh pages (slot masks cleared), or None when fewer than n are free."""

    @abstractmethod
    def free_pages(self, pages: list[int]) -> None:
        """Give pages back; raises PageStateError for a page that is not allocated."""

    @property
    @abstractmethod
    def num_free_pages(self) -> int: ...

    @abstractmethod
    def step(self, batch: StepBatch) -> StepOutput:
        """Run one batched forward pass: write the inputs' KV, attend, sample at the outputs.

        Raises InvalidRequestError naming the request when the batch is malformed, before
        any KV is written. On success returns one OutputResult per output position.
        """

    @abstractmethod
    def copy_slots(self, src_page: int, dst_page: int, src_start: int, dst_start: int, length: int) -> None:
        """Copy `length` token slots (K, V and mask bits) from one page to another."""

    @abstractmethod
    def mask_slots(self, page: int, masked: list[bool]) -> None:
        """Hide (True) or show (False) each token slot of a page to all later attention."""

    @abstractmethod
    def read_pages(self, pages: list[int]) -> bytes:
        """The whole contents of pages (K, V of every layer and the slot masks), to move them to
        another executor of the same model and dtype with write_pages."""

    @abstractmethod
    def write_pages(self, pages: list[int], data: bytes) -> None:
        """Overwrite pages with what read_pages gave for as many pages elsewhere; raises
        InvalidRequestError when data does not have that size."""

    @abstractmethod
    def check_idle_invariant(self) -> None:
        """Raise PageStateError unless free + allocated pages == total."""
