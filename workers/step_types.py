"""Typed messages at the executor boundary: one batched step in CSR form, and its results.

A batch holds `num_requests` forward requests. Request i owns input tokens
`token_ids[qo_indptr[i]:qo_indptr[i+1]]` and KV pages
`kv_page_indices[kv_page_indptr[i]:kv_page_indptr[i+1]]`. Its KV sequence is those pages
concatenated, `kv_len = (num_pages - 1) * page_size + kv_last_page_lens[i]` slots long,
*including* this step's input tokens, whose keys and values the step writes into the last
`q_len` slots. By default a token attends to every earlier slot and itself (causal in slot
order; RoPE uses `position_ids`, which need not be contiguous). Slots masked in their page
(`Executor.mask_slots`) are invisible to every query.

Arrays are numpy so batches cross process boundaries as plain buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sampler:
    """What to compute at one output position. Exactly one `kind`:

    - "greedy": the argmax token.
    - "sample": a token drawn at `temperature` after top-k / top-p / min-p filtering
      (0 / 1.0 / 0.0 switch each filter off). With a `seed` the draw is a deterministic
      function of (seed, the output's position id, logits); without one the executor's
      own generator is used.
    - "distribution": the `top_k` most likely tokens and their probabilities at `temperature`.
    - "logprobs": log-probabilities (temperature 1) of the given `token_ids`.

    `allowed` optionally restricts the vocabulary: a bool array of length vocab_size,
    True where a token may be produced (a grammar's next-token mask). It applies before
    every kind, and probabilities renormalize over the allowed tokens.

    `with_logprob` ("greedy" and "sample"): also return the chosen token's log-probability
    under the model's own distribution (log-softmax of the logits: before temperature, filters
    and `allowed`), as OpenAI's and vLLM's logprobs report it. Off by default: it costs a
    log-softmax over the vocabulary per output.
    """

    kind: str = "greedy"
    temperature: float = 1.0  # > 0 for "sample" and "distribution"
    top_k: int = 0  # "sample": keep the k most likely (0 = all); "distribution": how many to return
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p * the most likely token's probability
    seed: int | None = None
    token_ids: tuple[int, ...] = ()  # "logprobs": the tokens to score
    allowed: np.ndarray | None = None  # [vocab_size] bool, True = may be produced
    with_logprob: bool = False  # "greedy" / "sample": also return the token's log-probability

    KINDS = ("greedy", "sample", "distribution", "logprobs")


@dataclass(frozen=True)
class ForwardRequest:
    """One request's share of a step, in request-local terms (see `pack_batch`)."""

    token_ids: np.ndarray  # [q_len] int, input tokens
    position_ids: np.ndarray  # [q_len] int, RoPE position of each input token
    kv_page_indices: np.ndarray  # [num_pages] int, pages of the KV sequence in order
    kv_last_page_len: int  # filled slots of the last page after this step's tokens are written
    output_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_outputs] into token_ids
    samplers: tuple[Sampler, ...] = ()  # [num_outputs]
    attention_mask: np.ndarray | None = None  # [q_len, kv_len] bool, True = may attend; None = causal


@dataclass
class StepBatch:
    """The whole step, all requests concatenated (the layout FlashInfer and vLLM use)."""

    token_ids: np.ndarray  # [num_tokens] int64
    position_ids: np.ndarray  # [num_tokens] int64
    qo_indptr: np.ndarray  # [num_requests + 1] int64, token offsets per request
    kv_page_indices: np.ndarray  # [total_pages] int64
    kv_page_indptr: np.ndarray  # [num_requests + 1] int64, page offsets per request
    kv_last_page_lens: np.ndarray  # [num_requests] int64, in [1, page_size]
    output_token_indices: np.ndarray  # [num_outputs] int64, indices into token_ids
    samplers: list[Sampler]  # [num_outputs]
    # packed custom masks: request i's [q_len, kv_len] bool mask, row-major, is
    # custom_mask[custom_mask_indptr[i]:custom_mask_indptr[i+1]]; an empty range means causal
    custom_mask: np.ndarray | None = None  # [sum of masked q_len * kv_len] bool
    custom_mask_indptr: np.ndarray | None = None  # [num_requests + 1] int64

    @property
    def num_requests(self) -> int:
        return len(self.qo_indptr) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class OutputResult:
    """The result at one output position; which fields are set follows its sampler's kind."""

    token: int | None = None  # "greedy" and "sample"
    ids: np.ndarray | None = None  # "distribution": [top_k] int64, most likely first
    probs: np.ndarray | None = None  # "distribution": [top_k] float32
    logprobs: np.ndarray | None = None  # "logprobs": [len(token_ids)] float32
    logprob: float | None = None  # "greedy" / "sample" with_logprob: the token's log-probability


@dataclass
class StepOutput:
    results: list[OutputResult]  # [num_outputs], in the order of output_token_indices


def pack_batch(requests: list[ForwardRequest]) -> StepBatch:
    """Concatenate request-local forward requests into one CSR step batch."""
    as_i64 = lambda a: np.asarray(a, dtype=np.int64).reshape(-1)
    tokens = [as_i64(r.token_ids) for r in requests]
    pages = [as_i64(r.kv_page_indices) for r in requests]
    q_lens = np.array([len(t) for t in tokens], dtype=np.int64)
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    kv_page_indptr = np.concatenate([[0], np.cumsum([len(p) for p in pages])]).astype(np.int64)
    outputs = [as_i64(r.output_indices) + qo_indptr[i] for i, r in enumerate(requests)]
    masked = [r.attention_mask is not None for r in requests]
    custom_mask = custom_mask_indptr = None
    if any(masked):
        flat = [np.asarray(r.attention_mask, dtype=bool).reshape(-1) if m else np.zeros(0, bool)
                for r, m in zip(requests, masked)]
        custom_mask_indptr = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int64)
        custom_mask = np.concatenate(flat)
    empty = np.zeros(0, np.int64)
    return StepBatch(
        token_ids=np.concatenate(tokens) if tokens else empty,
        position_ids=np.concatenate([as_i64(r.position_ids) for r in requests]) if requests else empty,
        qo_indptr=qo_indptr,
        kv_page_indices=np.concatenate(pages) if pages else empty,
        kv_page_indptr=kv_page_indptr,
        kv_last_page_lens=np.array([r.kv_last_page_len for r in requests], dtype=np.int64),
        output_token_indices=np.concatenate(outputs) if outputs else empty,
        samplers=[s for r in requests for s in r.samplers],
        custom_mask=custom_mask,
        custom_mask_indptr=custom_mask_indptr,
    )
