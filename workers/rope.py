"""Rotary position embeddings in Hugging Face's rotate-half convention, with Llama-3 scaling."""
from __future__ import annotations

import math

import torch

from workers.model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float64 rotation frequencies, scaled when the model asks for it."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = config.rope_scaling
    if s:  # "llama3": stretch low frequencies, keep high ones, blend between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_ctx / low, inv / factor, torch.where(wavelen < old_ctx / high, inv, blended))
    return inv


class RotaryTable:
    """cos and signed sin for every position, so a step only gathers rows.

    With `roll(x)` = x's halves swapped, the rotation is `x * cos + roll(x) * signed_sin`,
    where signed_sin = [-sin, sin] per half.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        inv = inverse_frequencies(config)
        pos = torch.arange(config.max_position, dtype=torch.float64)
        angles = torch.outer(pos, inv)  # [max_position, head_dim // 2]
        cos, sin = angles.cos(), angles.sin()
        self.cos = torch.cat([cos, cos], dim=-1).to(device=device, dtype=dtype)
        self.signed_sin = torch.cat([-sin, sin], dim=-1).to(device=device, dtype=dtype)
        self.half = config.head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed_sin as [num_tokens, 1, head_dim], broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [num_tokens, heads, head_dim] (any strides) into a new tensor."""
        return torch.addcmul(x * cos, torch.roll(x, self.half, dims=-1), signed_sin)
