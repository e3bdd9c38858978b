"""Each attention layer's implementation, wrapped: vLLM's kernel for the plain requests of a step,
torch's SDPA for the ones with custom masks or masked slots, over the same KV tensors.

vLLM's layers call `impl.forward(layer, query, key, value, kv_cache, attn_metadata, output)` with
the metadata we put in the forward context (a StepAttention), after `impl.do_kv_cache_update` has
written every token's keys and values through the step's slot mapping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.vllm_exec.step_plan import StepAttention


def has_torch_path(impl) -> bool:
    """Whether SDPA computes what this impl does: no soft cap, ALiBi, sinks or sliding window."""
    return (not getattr(impl, "logits_soft_cap", 0) and getattr(impl, "alibi_slopes", None) is None
            and getattr(impl, "sinks", None) is None and getattr(impl, "sliding_window", None) in (None, -1))


class StepAttentionImpl:
    def __init__(self, inner, keys: torch.Tensor, values: torch.Tensor, writes_in_forward: bool):
        self.inner = inner  # the backend's own impl
        self.keys, self.values = keys, values  # this layer's cache as [num_pages, page_size, kv_heads, head_dim] views
        self.writes_in_forward = writes_in_forward  # the backend writes KV in forward (for its tokens only)

    def __getattr__(self, name):  # everything else vLLM reads from an impl
        return getattr(self.inner, name)

    def do_kv_cache_update(self, *args, **kwargs):
        return self.inner.do_kv_cache_update(*args, **kwargs)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: StepAttention | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """query [tokens, heads, dim], key and value [tokens, kv_heads, dim]; fills output [tokens, heads, dim]."""
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        if attn_metadata.vllm is not None:
            self.inner.forward(layer, query, key, value, kv_cache, attn_metadata.vllm, output=output,
                               output_scale=output_scale, output_block_scale=output_block_scale)
        for r in attn_metadata.torch_requests:
            if self.writes_in_forward:
                q_len = r.stop - r.start
                self.keys[r.pages[-q_len:], r.slots[-q_len:]] = key[r.start:r.stop]
                self.values[r.pages[-q_len:], r.slots[-q_len:]] = value[r.start:r.stop]
            k = self.keys[r.pages, r.slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, kv_len, dim]
            v = self.values[r.pages, r.slots].transpose(0, 1).unsqueeze(0)
            q = query[r.start:r.stop].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=r.mask, scale=self.inner.scale, enable_gqa=True)
            output[r.start:r.stop] = o.squeeze(0).transpose(0, 1).to(output.dtype)
        return output
