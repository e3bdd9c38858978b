"""Turns logits at output positions into tokens, distributions and logprobs (see `Sampler`)."""
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


def filtered_probs(row: torch.Tensor, s: Sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature, then top-k, top-p and min-p (in that order) for one row of logits.

    Returns (probs, ids): probs over `ids` when the candidates were narrowed (ids not None),
    else over the whole vocabulary. Zeroed entries are filtered out.
    """
    row = row / s.temperature
    ids = None
    if s.top_k > 0 and s.top_k < row.shape[0]:
        row, ids = torch.topk(row, s.top_k)  # sorted, most likely first
    elif s.top_p < 1.0:
        row, ids = torch.sort(row, descending=True)
    probs = torch.softmax(row, dim=-1)
    if s.top_p < 1.0:  # probs are sorted here: keep the shortest prefix reaching top_p
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        probs = torch.where(before < s.top_p, probs, torch.zeros_like(probs))
    if s.min_p > 0:
        probs = torch.where(probs >= s.min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs, ids


def sample_outputs(logits: torch.Tensor, samplers: list[Sampler], positions: list[int],
                   generator: torch.Generator) -> list[OutputResult]:
    """logits: float32 [num_outputs, vocab]; positions: [num_outputs] position ids (for seeds)."""
    logits = apply_allowed(logits, samplers)
    results = [OutputResult() for _ in samplers]
    greedy = [j for j, s in enumerate(samplers) if s.kind == "greedy"]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        for j, token in zip(greedy, logits.index_select(0, index).argmax(dim=-1).tolist()):
            results[j].token = token
    for j, s in enumerate(samplers):
        if s.kind == "sample":
            probs, ids = filtered_probs(logits[j], s)
            g = generator if s.seed is None else seeded_generator(s.seed, positions[j], logits.device)
            pick = int(torch.multinomial(probs, 1, generator=g))
            results[j].token = pick if ids is None else int(ids[pick])
        elif s.kind == "distribution":
            probs = torch.softmax(logits[j] / s.temperature, dim=-1)
            top = torch.topk(probs, s.top_k)
            results[j].ids = top.indices.cpu().numpy().astype(np.int64)
            results[j].probs = top.values.cpu().numpy().astype(np.float32)
        elif s.kind == "logprobs":
            logp = torch.log_softmax(logits[j], dim=-1)
            results[j].logprobs = logp[torch.tensor(s.token_ids, device=logits.device)].cpu().numpy()
    return results
