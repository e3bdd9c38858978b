"""Paged attention over a step batch: the plan is built once per step, applied in every layer.

This is the one place attention is computed, so a faster kernel (a GPU one) replaces
`paged_attention` without touching the model. Requests split into two groups:
- decodes (one input token, no custom mask) run together as one padded batch;
- every other request (prefill, chunked prefill, custom mask) runs on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.errors import InvalidRequestError
from workers.kv_cache import PagedKVCache
from workers.step_types import StepBatch


@dataclass
class DecodeGroup:
    token_index: torch.Tensor | None  # [B] rows of the step's tokens; None when they are all of them, in order
    key_rows: torch.Tensor  # [B * max_kv] flat KV rows of keys, padded
    value_rows: torch.Tensor  # key_rows + page_size: computed once a step, not once a layer
    mask: torch.Tensor | None  # [B, 1, 1, max_kv] bool, True = attend; None = attend to all
    batch: int
    max_kv: int


@dataclass
class RequestAttention:
    start: int  # first token of the request in the step
    stop: int  # one past its last token
    key_rows: torch.Tensor  # [kv_len] flat KV rows of keys
    value_rows: torch.Tensor  # key_rows + page_size
    mask: torch.Tensor | None  # [1, 1, q_len, kv_len] bool; None = causal with q_len == kv_len


@dataclass
class AttentionPlan:
    write_key_rows: torch.Tensor  # [num_tokens] where each input token's key goes
    write_value_rows: torch.Tensor  # write_key_rows + page_size
    decode: DecodeGroup | None
    others: list[RequestAttention]


def kv_slots(batch: StepBatch, i: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pages, slots) of each KV slot of request i, in sequence order."""
    pages = batch.kv_page_indices[batch.kv_page_indptr[i]:batch.kv_page_indptr[i + 1]]
    kv_len = (len(pages) - 1) * page_size + int(batch.kv_last_page_lens[i])
    seq = np.arange(kv_len)
    return pages[seq // page_size], seq % page_size


def custom_mask_of(batch: StepBatch, i: int, q_len: int, kv_len: int) -> np.ndarray | None:
    """Request i's [q_len, kv_len] custom mask, or None when it has none (causal)."""
    if batch.custom_mask_indptr is None or batch.custom_mask_indptr[i + 1] == batch.custom_mask_indptr[i]:
        return None
    m0, m1 = batch.custom_mask_indptr[i], batch.custom_mask_indptr[i + 1]
    return batch.custom_mask[m0:m1].reshape(q_len, kv_len)


def build_plan(batch: StepBatch, kv: PagedKVCache, device: torch.device) -> AttentionPlan:
    ps = kv.page_size
    slot_masked = kv.slot_masked if kv.slot_masked.any() else None
    q_lens = np.diff(batch.qo_indptr)
    write_rows = np.empty(batch.num_tokens, dtype=np.int64)
    decode_ids: list[int] = []
    decode_rows: list[np.ndarray] = []
    decode_visible: list[np.ndarray | None] = []
    others: list[RequestAttention] = []
    for i in range(batch.num_requests):
        pages, slots = kv_slots(batch, i, ps)
        rows = pages * (2 * ps) + slots
        kv_len, q_len = len(rows), int(q_lens[i])
        t0, t1 = int(batch.qo_indptr[i]), int(batch.qo_indptr[i + 1])
        write_rows[t0:t1] = rows[kv_len - q_len:]
        visible = None if slot_masked is None else ~slot_masked[pages, slots]  # [kv_len]
        custom = custom_mask_of(batch, i, q_len, kv_len)
        if q_len == 1 and custom is None:
            if visible is not None and not visible.any():
                raise InvalidRequestError("every KV slot it would attend to is masked", i)
            decode_ids.append(t0)
            decode_rows.append(rows)
            decode_visible.append(visible)
            continue
        mask = request_mask(custom, visible, q_len, kv_len, i)
        others.append(RequestAttention(
            t0, t1, torch.from_numpy(rows).to(device), torch.from_numpy(rows + ps).to(device),
            None if mask is None else torch.from_numpy(mask).to(device).view(1, 1, q_len, kv_len)))
    decode = _decode_group(decode_ids, decode_rows, decode_visible, batch.num_tokens, ps, device) if decode_ids else None
    return AttentionPlan(torch.from_numpy(write_rows).to(device), torch.from_numpy(write_rows + ps).to(device),
                         decode, others)


def request_mask(custom: np.ndarray | None, visible: np.ndarray | None, q_len: int, kv_len: int,
                 request: int) -> np.ndarray | None:
    """[q_len, kv_len] bool, True = may attend: the custom mask (else causal in slot order) less
    the masked slots; None when that is plain causal attention with q_len == kv_len."""
    mask = custom
    if mask is None and (visible is not None or q_len != kv_len):
        mask = np.tril(np.ones((q_len, kv_len), dtype=bool), k=kv_len - q_len)
    if visible is not None:
        mask = mask & visible[None, :]
    if mask is not None and not mask.any(axis=1).all():
        raise InvalidRequestError("an input token has every KV slot it would attend to masked", request)
    return mask


def _decode_group(ids: list[int], rows: list[np.ndarray], visible: list[np.ndarray | None], num_tokens: int,
                  page_size: int, device: torch.device) -> DecodeGroup:
    b = len(ids)
    lens = np.array([len(r) for r in rows])
    max_kv = int(lens.max())
    padded = np.zeros((b, max_kv), dtype=np.int64)
    attend = np.zeros((b, max_kv), dtype=bool)
    for j, (r, v) in enumerate(zip(rows, visible)):
        padded[j, :len(r)] = r
        attend[j, :len(r)] = True if v is None else v
    mask = None if attend.all() else torch.from_numpy(attend).to(device).view(b, 1, 1, max_kv)
    in_order = ids == list(range(num_tokens))
    token_index = None if in_order else torch.tensor(ids, dtype=torch.int64, device=device)
    flat = padded.reshape(-1)
    return DecodeGroup(token_index, torch.from_numpy(flat).to(device), torch.from_numpy(flat + page_size).to(device),
                       mask, b, max_kv)


def write_kv(kv_flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> None:
    """Store this step's keys and values [num_tokens, kv_heads, head_dim] in their slots."""
    kv_flat.index_copy_(0, plan.write_key_rows, k)
    kv_flat.index_copy_(0, plan.write_value_rows, v)


def paged_attention(q: torch.Tensor, kv_flat: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q [num_tokens, heads, head_dim] over the paged KV of one layer -> [num_tokens, heads, head_dim]."""
    d = plan.decode
    if d is not None:
        o = _decode_attention(q if d.token_index is None else q.index_select(0, d.token_index), kv_flat, d)
        if d.token_index is None:  # every token is a decode, in order
            return o
    out = torch.empty_like(q)
    if d is not None:
        out.index_copy_(0, d.token_index, o)
    for r in plan.others:
        k = kv_flat.index_select(0, r.key_rows).transpose(0, 1).unsqueeze(0)
        v = kv_flat.index_select(0, r.value_rows).transpose(0, 1).unsqueeze(0)
        qr = q[r.start:r.stop].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=r.mask, is_causal=r.mask is None, enable_gqa=True)
        out[r.start:r.stop] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, kv_flat: torch.Tensor, d: DecodeGroup) -> torch.Tensor:
    """q [batch, heads, head_dim], one token per request, over each request's padded KV rows."""
    kv_heads, head_dim = kv_flat.shape[1], kv_flat.shape[2]
    k = kv_flat.index_select(0, d.key_rows).view(d.batch, d.max_kv, kv_heads, head_dim).transpose(1, 2)
    v = kv_flat.index_select(0, d.value_rows).view(d.batch, d.max_kv, kv_heads, head_dim).transpose(1, 2)
    # fold each KV head's query heads into the query-length axis: plain MHA, no GQA expansion
    groups = q.shape[1] // kv_heads
    o = F.scaled_dot_product_attention(q.view(d.batch, kv_heads, groups, head_dim), k, v, attn_mask=d.mask)
    return o.reshape(d.batch, kv_heads * groups, head_dim)
