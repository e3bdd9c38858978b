"""Turns logits at output positions into tokens, distributions and logprobs (see `Sampler`).

Every kind is computed for all its rows at once. Sampling semantics, per row:
1. p = softmax(logits / temperature) over the allowed tokens;
2. top-k keeps the k most likely; 3. top-p keeps, among those, the shortest most-likely
prefix whose renormalized mass reaches top_p; 4. min-p keeps tokens with p >= min_p * max p;
5. a token is drawn in proportion to p among the kept ones, by inverse CDF with uniform
numbers from the row's seed (else the executor's generator).
Ties at the top-p boundary are kept. Top-p without top-k never sorts the vocabulary: it
samples by rejection (see `_nucleus_draw`).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from workers.step_types import OutputResult, Sampler

def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """A generator that depends on both the request's seed and the output's position, so a
    request reusing one seed every step still gets a fresh, reproducible draw per position."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def apply_allowed(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """Set disallowed tokens to -inf in place, for rows whose sampler has a logit mask."""
    rows = [j for j, s in enumerate(samplers) if s.allowed is not None]
    if rows:
        allowed = torch.from_numpy(np.stack([np.asarray(samplers[j].allowed, dtype=bool) for j in rows]))
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def _column(samplers: list[Sampler], attr: str, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([getattr(s, attr) for s in samplers], dtype=dtype, device=device).unsqueeze(1)


class RowRandom:
    """Uniform numbers per row: a seeded row draws from its own generator, the rest share `shared`."""

    def __init__(self, samplers: list[Sampler], positions: list[int], shared: torch.Generator, device: torch.device):
        self.device, self.shared = device, shared
        self.own = {j: seeded_generator(s.seed, pos, device)
                    for j, (s, pos) in enumerate(zip(samplers, positions)) if s.seed is not None}

    def next(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), 1] uniforms in [0, 1) for these rows."""
        u = torch.rand(len(rows), generator=self.shared, device=self.device)
        for r, j in enumerate(rows):
            if j in self.own:
                u[r] = torch.rand(1, generator=self.own[j], device=self.device)[0]
        return u.unsqueeze(1)


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index per row drawn in proportion to non-negative `weights` [n, m] (each row has mass)."""
    cum = torch.cumsum(weights, dim=-1)
    index = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return index.clamp_(max=weights.shape[1] - 1).squeeze(1)


def _top_k_draw(probs: torch.Tensor, samplers: list[Sampler], u: torch.Tensor) -> torch.Tensor:
    """Rows with top_k > 0: top-p and min-p among the k most likely, then a draw."""
    width = min(max(s.top_k for s in samplers), probs.shape[-1])  # a top_k beyond the vocabulary keeps it all
    vals, ids = torch.topk(probs, width, dim=-1)  # most likely first
    device = probs.device
    k = torch.tensor([s.top_k for s in samplers], device=device).unsqueeze(1)
    w = torch.where(torch.arange(width, device=device).unsqueeze(0) < k, vals, torch.zeros_like(vals))
    before = torch.cumsum(w, dim=-1) - w  # mass of the more likely kept tokens
    w = torch.where(before < _column(samplers, "top_p", device) * w.sum(dim=-1, keepdim=True), w, torch.zeros_like(w))
    w = torch.where(vals >= _column(samplers, "min_p", device) * vals[:, :1], w, torch.zeros_like(w))
    return ids.gather(1, _draw(w, u).unsqueeze(1)).squeeze(1)


MAX_REJECTIONS = 64


def _nucleus_draw(probs: torch.Tensor, samplers: list[Sampler], rows: list[int], rng: RowRandom) -> torch.Tensor:
    """Rows without top-k: top-p and min-p by rejection, with no sort of the vocabulary.

    A token x is in the top-p set when the mass of strictly more likely tokens is below top_p
    (ties at the boundary are kept). Draw from the candidates; on a miss, every token no more
    likely than the miss is out too, so drop them all and draw again. The most likely token is
    always in, so this ends; misses shrink the candidates geometrically.
    """
    top_p = _column(samplers, "top_p", probs.device)
    floor = _column(samplers, "min_p", probs.device) * probs.max(dim=-1, keepdim=True).values
    w = torch.where(probs >= floor, probs, torch.zeros_like(probs))
    picks = torch.zeros(len(rows), dtype=torch.int64, device=probs.device)
    pending = torch.arange(len(rows), device=probs.device)
    for _ in range(MAX_REJECTIONS):
        p, x = probs[pending], _draw(w[pending], rng.next([rows[int(r)] for r in pending]))
        px = p.gather(1, x.unsqueeze(1))
        above = torch.where(p > px, p, torch.zeros_like(p)).sum(dim=-1)
        hit = above < top_p[pending, 0]
        picks[pending[hit]] = x[hit]
        missed = pending[~hit]
        if len(missed) == 0:
            return picks
        w[missed] = torch.where(probs[missed] > px[~hit], w[missed], torch.zeros_like(w[missed]))
        pending = missed
    picks[pending] = probs[pending].argmax(dim=-1)  # unreachable in practice: the surviving top token
    return picks


def sample_tokens(logits: torch.Tensor, samplers: list[Sampler], positions: list[int],
                  generator: torch.Generator) -> list[int]:
    """Draw one token per row of logits [n, vocab] under "sample" samplers."""
    device = logits.device
    probs = torch.softmax(logits / _column(samplers, "temperature", device), dim=-1)
    rng = RowRandom(samplers, positions, generator, device)
    tokens = torch.empty(len(samplers), dtype=torch.int64, device=device)
    groups = {"plain": [], "top_k": [], "nucleus": []}
    for j, s in enumerate(samplers):
        kind = "top_k" if s.top_k > 0 else "plain" if s.top_p >= 1.0 and s.min_p == 0 else "nucleus"
        groups[kind].append(j)
    for kind, rows in groups.items():
        if not rows:
            continue
        index = torch.tensor(rows, device=device)
        group = [samplers[j] for j in rows]
        if kind == "plain":  # no filter: draw over the vocabulary in id order
            tokens[index] = _draw(probs[index], rng.next(rows))
        elif kind == "top_k":
            tokens[index] = _top_k_draw(probs[index], group, rng.next(rows))
        else:
            tokens[index] = _nucleus_draw(probs[index], group, rows, rng)
    return tokens.tolist()


def sample_outputs(logits: torch.Tensor, samplers: list[Sampler], positions: list[int],
                   generator: torch.Generator) -> list[OutputResult]:
    """logits: float32 [num_outputs, vocab]; positions: [num_outputs] position ids (for seeds)."""
    device = logits.device
    scored = [j for j, s in enumerate(samplers) if s.with_logprob and s.kind in ("greedy", "sample")]
    if scored:  # the model's normalizer, before the masks change the rows in place
        scored_index = torch.tensor(scored, device=device)
        normalizer = torch.logsumexp(logits.index_select(0, scored_index), dim=-1)
    logits = apply_allowed(logits, samplers)
    results = [OutputResult() for _ in samplers]
    by_kind: dict[str, list[int]] = {}
    for j, s in enumerate(samplers):
        by_kind.setdefault(s.kind, []).append(j)
    rows_of = lambda kind: logits.index_select(0, torch.tensor(by_kind[kind], device=device))
    if "greedy" in by_kind:
        for j, token in zip(by_kind["greedy"], rows_of("greedy").argmax(dim=-1).tolist()):
            results[j].token = token
    if "sample" in by_kind:
        js = by_kind["sample"]
        tokens = sample_tokens(rows_of("sample"), [samplers[j] for j in js], [positions[j] for j in js], generator)
        for j, token in zip(js, tokens):
            results[j].token = token
    if scored:  # the chosen token's log-softmax (an allowed token's logit is unchanged by its mask)
        chosen = torch.tensor([results[j].token for j in scored], device=device)
        logp = logits.index_select(0, scored_index).gather(1, chosen[:, None]).squeeze(1) - normalizer
        for j, value in zip(scored, logp.tolist()):
            results[j].logprob = value
    if "distribution" in by_kind:
        js = by_kind["distribution"]
        probs = torch.softmax(rows_of("distribution") / _column([samplers[j] for j in js], "temperature", device), -1)
        top = torch.topk(probs, max(samplers[j].top_k for j in js), dim=-1)
        ids, vals = top.indices.cpu().numpy(), top.values.cpu().numpy()
        for r, j in enumerate(js):
            k = samplers[j].top_k
            results[j].ids, results[j].probs = ids[r, :k].astype(np.int64), vals[r, :k].astype(np.float32)
    if "logprobs" in by_kind:
        js = by_kind["logprobs"]
        logp = torch.log_softmax(rows_of("logprobs"), dim=-1)
        for r, j in enumerate(js):
            index = torch.tensor(samplers[j].token_ids, device=device)
            results[j].logprobs = logp[r].index_select(0, index).cpu().numpy()
    return results
