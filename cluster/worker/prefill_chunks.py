"""Splitting one forward pass into chunks of its input tokens, run in successive steps.

A pass writes its q_len input tokens into the last q_len slots of its KV sequence. The chunk
of input tokens [start, end) is the same pass cut short: its KV sequence ends after token
end - 1 (so it holds only the pages that covers), its outputs are those that fall inside the
chunk, and its attention-mask rows are those tokens' rows cut to that shorter sequence. Run in
order, the chunks write the same slots and attend to the same keys as the whole pass did,
so they produce the same outputs (up to floating-point summation order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.step_types import ForwardRequest


@dataclass(frozen=True)
class Chunk:
    request: ForwardRequest  # the chunk as a pass of its own
    outputs: tuple[int, ...]  # for each of its outputs, the index of that output in the whole pass


def kv_len(request: ForwardRequest, page_size: int) -> int:
    """Slots in the pass's KV sequence, its own input tokens included."""
    return (len(request.kv_page_indices) - 1) * page_size + int(request.kv_last_page_len)


def chunk(request: ForwardRequest, start: int, end: int, page_size: int) -> Chunk:
    q_len = len(request.token_ids)
    if not 0 <= start < end <= q_len:
        raise ValueError(f"chunk [{start}, {end}) is not inside a pass of {q_len} tokens")
    chunk_kv = kv_len(request, page_size) - q_len + end
    num_pages = -(-chunk_kv // page_size)
    outputs = np.asarray(request.output_indices)
    inside = np.flatnonzero((outputs >= start) & (outputs < end))
    mask = request.attention_mask
    return Chunk(
        request=ForwardRequest(
            token_ids=request.token_ids[start:end],
            position_ids=request.position_ids[start:end],
            kv_page_indices=request.kv_page_indices[:num_pages],
            kv_last_page_len=chunk_kv - (num_pages - 1) * page_size,
            output_indices=outputs[inside] - start,
            samplers=tuple(request.samplers[i] for i in inside),
            attention_mask=None if mask is None else mask[start:end, :chunk_kv],
        ),
        outputs=tuple(int(i) for i in inside),
    )


def written_pages(request: ForwardRequest, page_size: int, from_token: int = 0) -> set[int]:
    """Pages that input tokens [from_token, q_len) of the pass write into."""
    first_slot = kv_len(request, page_size) - len(request.token_ids) + from_token
    return set(request.kv_page_indices[first_slot // page_size:].tolist())
