"""A linear layer (and an embedding table) over a QuantTensor, with the kernels of kernels.cpp.

By the number of rows of x:
- up to 4 (decode): the fused kernel with 8-bit activations per block of 32, as llama.cpp does.
  The LM head keeps fp32 activations: 8-bit ones flipped near-tied first tokens, and the head
  is ~3 ms of a ~27 ms step either way (docs/benchmarks.md);
- 5 to DENSE_FROM - 1: tiles of weight rows unpacked to fp32 and multiplied in fp32;
- DENSE_FROM and up (prefill): the whole weight unpacked once and handed to the fp32 GEMM.
Inputs may be bf16 or fp32; the output has the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.quant import kernels
from workers.quant.blocks import QuantTensor

# rows of x from which unpacking the whole weight for the fp32 GEMM beats the tiled kernel: measured
# 8.35 vs 9.46 ms at 128 rows, 16.4 vs 16.5 at 256 on a 3072x576 Q4_1 weight (docs/benchmarks.md)
DENSE_FROM = 256


class QuantLinear:
    """y = x @ W.T + bias for a quantized W [out, in]."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None = None, a8: bool = True):
        self.weight = weight
        self.a8 = a8  # 8-bit activations on decode-sized calls (see the module doc)
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.float()
        self._k = kernels.load()

    def dense(self) -> torch.Tensor:
        w = self.weight
        return self._k.rows(w.qs, w.d, w.m, torch.arange(self.out_features))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if x2.shape[0] >= DENSE_FROM:
            y = F.linear(x2, self.dense())
        else:
            w = self.weight
            y = self._k.linear(x2, w.qs, w.d, w.m, self.a8)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class QuantEmbedding:
    """Rows of a quantized table, unpacked on lookup, in `dtype`."""

    def __init__(self, table: QuantTensor, dtype: torch.dtype):
        self.table = table
        self.dtype = dtype
        self._k = kernels.load()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        return self._k.rows(t.qs, t.d, t.m, ids.reshape(-1).long()).to(self.dtype).view(*ids.shape, -1)
