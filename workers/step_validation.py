"""Checks a StepBatch before it reaches the model; every error names the request at fault."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.errors import InvalidRequestError
from workers.step_types import ForwardRequest, Sampler, StepBatch


@dataclass(frozen=True)
class StepLimits:
    num_pages: int  # page ids are in [0, num_pages)
    page_size: int  # slots per page
    vocab_size: int
    max_position: int  # positions are in [0, max_position)
    sliding_window: int | None = None  # the model's window, when it is what caps max_position


def _check_indptr(name: str, indptr: np.ndarray, total: int, num_requests: int) -> None:
    if indptr.ndim != 1 or len(indptr) != num_requests + 1:
        raise InvalidRequestError(f"{name} must have num_requests + 1 = {num_requests + 1} entries, has {len(indptr)}")
    if indptr[0] != 0 or indptr[-1] != total:
        raise InvalidRequestError(f"{name} must start at 0 and end at {total}, got [{indptr[0]} .. {indptr[-1]}]")
    steps = np.diff(indptr)
    if (steps < 0).any():
        raise InvalidRequestError(f"{name} decreases", int(np.argmax(steps < 0)))


def validate_batch(batch: StepBatch, limits: StepLimits) -> None:
    """Raise InvalidRequestError for the first malformed request; return None if the batch is sound."""
    n = batch.num_requests
    if n < 0:
        raise InvalidRequestError("qo_indptr is empty: a batch needs num_requests + 1 offsets")
    if len(batch.position_ids) != batch.num_tokens:
        raise InvalidRequestError(
            f"position_ids has {len(batch.position_ids)} entries for {batch.num_tokens} tokens")
    _check_indptr("qo_indptr", batch.qo_indptr, batch.num_tokens, n)
    _check_indptr("kv_page_indptr", batch.kv_page_indptr, len(batch.kv_page_indices), n)
    if batch.custom_mask_indptr is not None:
        if batch.custom_mask is None:
            raise InvalidRequestError("custom_mask_indptr is set but custom_mask is missing")
        _check_indptr("custom_mask_indptr", batch.custom_mask_indptr, len(batch.custom_mask), n)
    if len(batch.kv_last_page_lens) != n:
        raise InvalidRequestError(f"kv_last_page_lens has {len(batch.kv_last_page_lens)} entries for {n} requests")
    for i in range(n):
        _check_request(batch, limits, i)
    _check_outputs(batch, limits)


def _check_request(batch: StepBatch, limits: StepLimits, i: int) -> None:
    t0, t1 = batch.qo_indptr[i], batch.qo_indptr[i + 1]
    p0, p1 = batch.kv_page_indptr[i], batch.kv_page_indptr[i + 1]
    q_len = int(t1 - t0)
    kv_len = _check_one(batch.token_ids[t0:t1].tolist(), batch.position_ids[t0:t1].tolist(),
                        batch.kv_page_indices[p0:p1].tolist(), int(batch.kv_last_page_lens[i]), limits, i)
    if batch.custom_mask_indptr is not None:
        m0, m1 = int(batch.custom_mask_indptr[i]), int(batch.custom_mask_indptr[i + 1])
        if m1 != m0 and m1 - m0 != q_len * kv_len:
            raise InvalidRequestError(
                f"attention mask has {m1 - m0} entries; it must be q_len x kv_len = {q_len} x {kv_len}", i)
        if m1 != m0:
            rows = batch.custom_mask[m0:m1].reshape(q_len, kv_len)
            if not rows.any(axis=1).all():
                raise InvalidRequestError("attention mask leaves an input token with nothing to attend to", i)


def validate_request(request: ForwardRequest, limits: StepLimits, index: int | None = None) -> None:
    """The checks validate_batch makes of one request, on the request itself: a worker checks
    each pass as it arrives, and packing a one-request batch to check it cost more than the
    checks (tens of microseconds a pass, on the path of every token). Errors name `index`."""
    tokens = _int_list(request.token_ids, "token_ids", index)
    positions = _int_list(request.position_ids, "position_ids", index)
    q_len = len(tokens)
    if len(positions) != q_len:
        raise InvalidRequestError(f"position_ids has {len(positions)} entries for {q_len} tokens", index)
    kv_len = _check_one(tokens, positions, _int_list(request.kv_page_indices, "kv_page_indices", index),
                        int(request.kv_last_page_len), limits, index)
    if request.attention_mask is not None:
        mask = np.asarray(request.attention_mask)
        if mask.shape != (q_len, kv_len):
            raise InvalidRequestError(f"attention mask has shape {mask.shape}; it must be q_len x kv_len = "
                                      f"{q_len} x {kv_len}", index)
        if not mask.astype(bool).any(axis=1).all():
            raise InvalidRequestError("attention mask leaves an input token with nothing to attend to", index)
    outputs = _int_list(request.output_indices, "output_indices", index)
    if len(outputs) != len(request.samplers):
        raise InvalidRequestError(f"{len(outputs)} output positions but {len(request.samplers)} samplers", index)
    for position, sampler in zip(outputs, request.samplers):
        if not 0 <= position < q_len:
            raise InvalidRequestError(f"output index {position} is outside the request's {q_len} tokens", index)
        _check_sampler(sampler, limits, index)


def _check_one(tokens: list[int], positions: list[int], pages: list[int], last: int, limits: StepLimits,
               index: int | None) -> int:
    """The checks of one request's tokens, positions and pages (as lists, which is faster than numpy at
    the sizes of a decode); returns its KV length."""
    q_len = len(tokens)
    if q_len == 0:
        raise InvalidRequestError("has no input tokens", index)
    if not pages:
        raise InvalidRequestError("has no KV pages", index)
    if not 1 <= last <= limits.page_size:
        raise InvalidRequestError(f"kv_last_page_len {last} is outside [1, page_size={limits.page_size}]", index)
    kv_len = (len(pages) - 1) * limits.page_size + last
    if kv_len < q_len:
        raise InvalidRequestError(f"its pages hold {kv_len} slots, fewer than its {q_len} input tokens", index)
    if min(pages) < 0 or max(pages) >= limits.num_pages:
        bad = next(p for p in pages if not 0 <= p < limits.num_pages)
        raise InvalidRequestError(f"page id {bad} is out of range [0, {limits.num_pages})", index)
    if len(set(pages)) != len(pages):
        raise InvalidRequestError("lists the same page twice in its KV sequence", index)
    if min(tokens) < 0 or max(tokens) >= limits.vocab_size:
        bad = next(t for t in tokens if not 0 <= t < limits.vocab_size)
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})", index)
    if min(positions) < 0 or max(positions) >= limits.max_position:
        bad = next(p for p in positions if not 0 <= p < limits.max_position)
        why = (f": the model attends within a sliding window of {limits.sliding_window} tokens, which this "
               f"executor does not implement, so a sequence may not grow past it" if limits.sliding_window else "")
        raise InvalidRequestError(f"position {bad} is beyond the model's context [0, {limits.max_position}){why}",
                                  index)
    return kv_len


def _int_list(values, name: str, index: int | None) -> list[int]:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise InvalidRequestError(f"{name} must be a flat list of integers, got {array.dtype} {array.shape}", index)
    return array.tolist()


def _check_outputs(batch: StepBatch, limits: StepLimits) -> None:
    outs = batch.output_token_indices
    if len(outs) != len(batch.samplers):
        raise InvalidRequestError(f"{len(outs)} output positions but {len(batch.samplers)} samplers")
    for index, sampler in zip(outs, batch.samplers):
        if not 0 <= index < batch.num_tokens:
            raise InvalidRequestError(f"output index {int(index)} is outside the batch's {batch.num_tokens} tokens")
        request = int(np.searchsorted(batch.qo_indptr, index, side="right") - 1)
        _check_sampler(sampler, limits, request)


def _check_sampler(s: Sampler, limits: StepLimits, request: int) -> None:
    if s.kind not in Sampler.KINDS:
        raise InvalidRequestError(f"sampler kind {s.kind!r} is not one of {Sampler.KINDS}", request)
    if s.kind in ("sample", "distribution") and not s.temperature > 0:
        raise InvalidRequestError(f"temperature must be > 0, got {s.temperature}", request)
    if s.top_k < 0 or (s.kind == "distribution" and not 1 <= s.top_k <= limits.vocab_size):
        raise InvalidRequestError(f"top_k {s.top_k} is invalid (distribution needs 1..vocab_size)", request)
    if not 0 < s.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {s.top_p}", request)
    if not 0 <= s.min_p <= 1:
        raise InvalidRequestError(f"min_p must be in [0, 1], got {s.min_p}", request)
    if s.kind == "logprobs":
        if not s.token_ids:
            raise InvalidRequestError("a logprobs sampler needs token_ids", request)
        bad = [t for t in s.token_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequestError(f"logprobs token id {bad[0]} is outside the vocabulary", request)
    if s.allowed is not None:
        allowed = np.asarray(s.allowed)
        if allowed.dtype != bool or allowed.shape != (limits.vocab_size,):
            raise InvalidRequestError(
                f"logit mask must be a bool array of shape ({limits.vocab_size},), got {allowed.dtype} {allowed.shape}",
                request)
        if not allowed.any():
            raise InvalidRequestError("logit mask allows no token", request)
