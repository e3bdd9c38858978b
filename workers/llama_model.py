"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) over a paged KV cache.

Plain tensors, no nn.Module: Q, K and V are fused into one matrix, gate and up into another,
so a layer is a handful of large matmuls plus attention. The math follows Hugging Face's
implementations (RMSNorm, rotate-half RoPE, SiLU-gated MLP), so their outputs are the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention import AttentionPlan, paged_attention, write_kv
from workers.errors import ModelLoadError
from workers.kv_cache import PagedKVCache
from workers.linear import Linear
from workers.quant import kernels
from workers.quant.blocks import QuantTensor, cat_rows
from workers.quant.linear import QuantEmbedding, QuantLinear
from workers.model_config import ModelConfig
from workers.rope import RotaryTable


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear | QuantLinear  # [(heads + 2 * kv_heads) * head_dim, hidden], bias for Qwen2
    q_norm: torch.Tensor | None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None  # [head_dim] (Qwen3)
    o: Linear | QuantLinear  # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: Linear | QuantLinear  # [2 * intermediate, hidden]
    down: Linear | QuantLinear  # [hidden, intermediate]


def _take(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return weights[name]
    except KeyError:
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}; is it a Llama-family model?") from None


class LlamaModel:
    """`quantized` ({HF name: QuantTensor}, see workers.quant.model_weights) replaces the float
    weights it names: the linear layers' and the token embedding's (the LM head when tied)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, quantized: dict[str, QuantTensor] | None = None):
        self.config = config
        self.dtype = dtype
        self.quantized = quantized or {}
        cast = lambda t: t.to(device=device, dtype=dtype).contiguous()
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        embed_name = "model.embed_tokens.weight"
        if embed_name in self.quantized:
            self.embed = QuantEmbedding(self.quantized[embed_name], dtype)
        else:
            table = cast(_take(weights, embed_name))
            self.embed = lambda ids: F.embedding(ids, table)
        self.lm_head = self._linear(weights, (embed_name if tied else "lm_head.weight",), None, cast, a8=False)
        self.norm = cast(_take(weights, "model.norm.weight"))
        self.layers = [self._layer(weights, i, cast) for i in range(config.num_layers)]
        self.rope = RotaryTable(config, dtype, device)
        # with the quantized kernels built, their one-pass fp32 RMSNorm replaces F.rms_norm (see kernels.cpp)
        self._fast_norm = bool(self.quantized) and dtype == torch.float32 and device.type == "cpu"
        self._kernels = kernels.load() if self._fast_norm else None

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of hidden states [tokens, hidden]."""
        if self._fast_norm:
            return self._kernels.rms_norm(x.contiguous(), w, self.config.rms_norm_eps)
        return F.rms_norm(x, (self.config.hidden_size,), w, self.config.rms_norm_eps)

    def _linear(self, w: dict[str, torch.Tensor], names: tuple[str, ...], bias: torch.Tensor | None,
                cast, a8: bool = True) -> Linear | QuantLinear:
        """One linear layer of these weights stacked by rows, quantized when all of them are."""
        if all(n in self.quantized for n in names):
            return QuantLinear(cat_rows([self.quantized[n] for n in names]), bias, a8)
        return Linear(cast(torch.cat([_take(w, n) for n in names])), bias)

    @staticmethod
    def _bias(w: dict[str, torch.Tensor], names: str | tuple[str, ...], cast) -> torch.Tensor | None:
        """The bias (concatenated, for fused projections) when the checkpoint has one."""
        names = (names,) if isinstance(names, str) else names
        present = [n in w for n in names]
        if not any(present):
            return None
        return cast(torch.cat([_take(w, n) for n in names]))

    def _layer(self, w: dict[str, torch.Tensor], i: int, cast) -> LayerWeights:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv_bias = self._bias(w, tuple(f"{attn}{x}_proj.bias" for x in "qkv"), cast) if self.config.qkv_bias else None
        return LayerWeights(
            attn_norm=cast(_take(w, p + "input_layernorm.weight")),
            qkv=self._linear(w, tuple(f"{attn}{x}_proj.weight" for x in "qkv"), qkv_bias, cast),
            q_norm=cast(_take(w, attn + "q_norm.weight")) if self.config.qk_norm else None,
            k_norm=cast(_take(w, attn + "k_norm.weight")) if self.config.qk_norm else None,
            o=self._linear(w, (attn + "o_proj.weight",), self._bias(w, attn + "o_proj.bias", cast), cast),
            mlp_norm=cast(_take(w, p + "post_attention_layernorm.weight")),
            gate_up=self._linear(w, (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                                 self._bias(w, (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"), cast), cast),
            down=self._linear(w, (p + "mlp.down_proj.weight",), self._bias(w, p + "mlp.down_proj.bias", cast), cast),
        )

    def forward(self, token_ids: torch.Tensor, position_ids: torch.Tensor, plan: AttentionPlan,
                kv: PagedKVCache, output_indices: torch.Tensor) -> torch.Tensor:
        """Run the step; return float32 logits [num_outputs, vocab] at `output_indices` only."""
        c = self.config
        eps = c.rms_norm_eps
        n_q, n_kv, d = c.num_heads, c.num_kv_heads, c.head_dim
        t = token_ids.shape[0]
        cos, sin = self.rope.lookup(position_ids)
        x = self.embed(token_ids)
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw.attn_norm)
            qkv = lw.qkv(h)
            v = qkv[:, (n_q + n_kv) * d:].view(t, n_kv, d)
            if lw.q_norm is None:
                qk = self.rope.apply(qkv[:, :(n_q + n_kv) * d].view(t, n_q + n_kv, d), cos, sin)
                q, k = qk[:, :n_q], qk[:, n_q:]
            else:
                q = F.rms_norm(qkv[:, :n_q * d].view(t, n_q, d), (d,), lw.q_norm, eps)
                k = F.rms_norm(qkv[:, n_q * d:(n_q + n_kv) * d].view(t, n_kv, d), (d,), lw.k_norm, eps)
                q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
            kv_flat = kv.flat(i)
            write_kv(kv_flat, k, v, plan)
            attn = paged_attention(q, kv_flat, plan)
            x = x + lw.o(attn.reshape(t, n_q * d))
            h = self._norm(x, lw.mlp_norm)
            gu = lw.gate_up(h)
            f = c.intermediate_size
            x = x + lw.down(F.silu(gu[:, :f]) * gu[:, f:])
        h = self._norm(x.index_select(0, output_indices), self.norm)
        return self.lm_head(h).float()
