"""A plain in-process generation loop straight on an Executor: many sequences, one step each.

It is the baseline an inferlet is measured against, the engine of `python -m workers.generate`
and the decode loop of the benchmark. It owns its sequences' pages and frees them at the end,
also when a step fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from workers.errors import OutOfPagesError
from workers.executor import Executor
from workers.step_types import ForwardRequest, Sampler, pack_batch


@dataclass
class Sequence:
    tokens: list[int]  # every token so far: prompt, then generated
    pending: list[int]  # tokens whose KV is not written yet (the next step's inputs)
    pages: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    done: bool = False


def _grow(executor: Executor, seq: Sequence) -> int:
    """Allocate pages so the sequence's KV fits; returns the fill of its last page."""
    ps = executor.info.page_size
    kv_len = len(seq.tokens)
    need = -(-kv_len // ps) - len(seq.pages)
    if need > 0:
        pages = executor.allocate_pages(need)
        if pages is None:
            raise OutOfPagesError(f"a sequence of {kv_len} tokens needs {need} more KV pages; "
                                  f"{executor.num_free_pages} are free (raise the KV budget or lower the batch)")
        seq.pages.extend(pages)
    return kv_len - (len(seq.pages) - 1) * ps


def generate(executor: Executor, prompts: list[list[int]], max_new_tokens: int,
             sampler: Sampler = Sampler(), stop_token_ids: tuple[int, ...] | None = None,
             on_step: Callable[[list[Sequence]], None] | None = None) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt, all in one batch per step.

    Stops a sequence at any of `stop_token_ids` (default: the model's; pass () to never stop).
    Returns the generated ids per prompt (the stop token included when one ended it).
    """
    stops = set(executor.info.stop_token_ids if stop_token_ids is None else stop_token_ids)
    seqs = [Sequence(tokens=list(p), pending=list(p), done=max_new_tokens <= 0) for p in prompts]
    try:
        while True:
            live = [s for s in seqs if not s.done]
            if not live:
                break
            requests = []
            for s in live:
                last = _grow(executor, s)
                start = len(s.tokens) - len(s.pending)
                requests.append(ForwardRequest(
                    token_ids=np.array(s.pending), position_ids=np.arange(start, len(s.tokens)),
                    kv_page_indices=np.array(s.pages), kv_last_page_len=last,
                    output_indices=np.array([len(s.pending) - 1]), samplers=(sampler,)))
            out = executor.step(pack_batch(requests))
            for s, r in zip(live, out.results):
                s.generated.append(r.token)
                s.tokens.append(r.token)
                s.pending = [r.token]
                s.done = r.token in stops or len(s.generated) >= max_new_tokens
            if on_step:
                on_step(live)
    finally:
        for s in seqs:
            if s.pages:
                executor.free_pages(s.pages)
    return [s.generated for s in seqs]
