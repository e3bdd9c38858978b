"""Turns our CSR step batch into vLLM's inputs: tokens, positions, slot mapping, attention metadata.

Requests split in two. Plain ones (causal attention, no masked slot in their pages) go to vLLM's
attention backend, whose metadata is built from our batch: page lists as block tables, sequence
lengths from last-page lengths. The others (a custom mask, or a masked slot they would see) are
moved after the plain ones and attended by `attention_impl` in torch over the same KV tensors.
Every token's KV is written by vLLM through the slot mapping, so both kinds see the same cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.attention import custom_mask_of, kv_slots, request_mask
from workers.errors import InvalidRequestError
from workers.kv_cache import PagedKVCache
from workers.step_types import StepBatch


@dataclass
class TorchRequest:
    """A request attended in torch: its tokens in the reordered step, its KV slots, its mask."""

    start: int
    stop: int
    pages: torch.Tensor  # [kv_len] page of each KV slot, in sequence order
    slots: torch.Tensor  # [kv_len] slot within that page
    mask: torch.Tensor  # [1, 1, q_len, kv_len] bool, True = may attend


@dataclass
class StepAttention:
    """What every attention layer gets as its metadata this step (see attention_impl)."""

    vllm: object | None  # the backend's metadata for the plain requests (the step's first tokens), or None
    torch_requests: list[TorchRequest]


@dataclass
class VllmStep:
    token_ids: torch.Tensor  # [num_tokens], plain requests first
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens] page * page_size + slot where each token's KV goes
    output_rows: torch.Tensor  # [num_outputs] rows of the reordered step, in the batch's output order
    attention: StepAttention


def _i32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


def plan_step(batch: StepBatch, kv: PagedKVCache, builder, device: torch.device, torch_path_ok: bool) -> VllmStep:
    """Raises InvalidRequestError naming the request before anything is written."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    ps = kv.page_size
    slot_masked = kv.slot_masked if kv.slot_masked.any() else None
    q_lens = np.diff(batch.qo_indptr).astype(np.int64)
    plain: list[int] = []
    special: list[int] = []
    slots_of: list[tuple[np.ndarray, np.ndarray]] = []
    masks: dict[int, np.ndarray] = {}
    for i in range(batch.num_requests):
        pages, slots = kv_slots(batch, i, ps)
        slots_of.append((pages, slots))
        kv_len, q_len = len(pages), int(q_lens[i])
        visible = None if slot_masked is None else ~slot_masked[pages, slots]
        if visible is not None and visible.all():
            visible = None
        custom = custom_mask_of(batch, i, q_len, kv_len)
        if custom is None and visible is None:
            plain.append(i)
            continue
        if not torch_path_ok:
            raise InvalidRequestError("this model's attention (soft cap, ALiBi, sinks or a window) has no torch path "
                                      "on the vLLM executor, so custom masks and masked slots cannot be served; "
                                      "use the torch executor", i)
        masks[i] = request_mask(custom, visible, q_len, kv_len, i)
        special.append(i)
    order = plain + special
    qo = batch.qo_indptr
    src = np.concatenate([np.arange(qo[i], qo[i + 1]) for i in order]) if order else np.zeros(0, np.int64)
    new_index = np.empty(batch.num_tokens, dtype=np.int64)
    new_index[src] = np.arange(batch.num_tokens)
    slot_mapping = np.zeros(batch.num_tokens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(q_lens[order])]).astype(np.int64)
    for j, i in enumerate(order):
        pages, slots = slots_of[i]
        q = int(q_lens[i])
        slot_mapping[starts[j]:starts[j + 1]] = pages[len(pages) - q:] * ps + slots[len(slots) - q:]
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
    torch_requests = [
        TorchRequest(int(starts[j]), int(starts[j + 1]), to(slots_of[i][0]), to(slots_of[i][1]),
                     torch.from_numpy(masks[i]).to(device).view(1, 1, *masks[i].shape))
        for j, i in enumerate(order) if i in masks]
    vllm_meta = None
    if plain:
        n = len(plain)
        seq_lens = np.array([len(slots_of[i][0]) for i in plain])
        page_counts = np.array([batch.kv_page_indptr[i + 1] - batch.kv_page_indptr[i] for i in plain])
        block_table = np.zeros((n, int(page_counts.max())), dtype=np.int32)
        for j, i in enumerate(plain):
            block_table[j, :page_counts[j]] = batch.kv_page_indices[batch.kv_page_indptr[i]:batch.kv_page_indptr[i + 1]]
        qsl = _i32(starts[:n + 1])
        num_plain_tokens = int(starts[n])
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=_i32(seq_lens).to(device),
            num_reqs=n, num_actual_tokens=num_plain_tokens, max_query_len=int(q_lens[plain].max()),
            max_seq_len=int(seq_lens.max()), block_table_tensor=_i32(block_table).to(device),
            slot_mapping=to(slot_mapping[:num_plain_tokens]), causal=True)
        vllm_meta = builder.build(common_prefix_len=0, common_attn_metadata=common)
    return VllmStep(to(batch.token_ids[src]), to(batch.position_ids[src]), to(slot_mapping),
                    to(new_index[batch.output_token_indices]), StepAttention(vllm_meta, torch_requests))
