"""Quantized weights in the kernels' layout: from GGUF blocks as they are, or quantized here.

A QuantTensor holds a weight [rows, cols] as Q4_1 or Q8_0 blocks of 32 along each row (see
kernels.cpp for the layout). GGUF Q4_0, Q4_1 and Q8_0 blocks are taken without a float round
trip (Q4_0 becomes Q4_1 with m = -8 d, which is exact); other weights are quantized with gguf's
own quantizers, which match llama.cpp's reference ones bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
KINDS = ("q4_1", "q8_0")
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_TYPES = tuple(_GGUF_BLOCK_BYTES)  # the GGUF block types from_gguf_blocks takes


@dataclass
class QuantTensor:
    kind: str  # "q4_1" or "q8_0"
    qs: torch.Tensor  # uint8 [rows, cols / 2] (q4_1) or int8 [rows, cols] (q8_0)
    d: torch.Tensor  # float16 [rows, cols / 32], as GGUF stores it
    m: torch.Tensor | None  # float16 [rows, cols / 32] (q4_1), else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    def take_rows(self, index: torch.Tensor | np.ndarray) -> QuantTensor:
        """These rows, in this order (a row permutation moves whole rows of blocks)."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t.index_select(0, index).contiguous()
        return QuantTensor(self.kind, pick(self.qs), pick(self.d), pick(self.m))

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols], computed in torch (the reference the kernels are checked against)."""
        rows, cols = self.shape
        if self.kind == "q8_0":
            return (self.qs.view(rows, -1, BLOCK).float() * self.d.float()[..., None]).view(rows, cols)
        q = self.qs.view(rows, -1, BLOCK // 2)
        q = torch.cat([q & 0x0F, q >> 4], dim=-1).float()
        return (q * self.d.float()[..., None] + self.m.float()[..., None]).view(rows, cols)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{self.kind}.qs": self.qs, f"{prefix}.{self.kind}.d": self.d}
        if self.m is not None:
            out[f"{prefix}.{self.kind}.m"] = self.m
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantTensor:
        kind = next(k for k in KINDS if f"{prefix}.{k}.qs" in tensors)
        return cls(kind, tensors[f"{prefix}.{kind}.qs"], tensors[f"{prefix}.{kind}.d"], tensors.get(f"{prefix}.{kind}.m"))


def cat_rows(parts: list[QuantTensor]) -> QuantTensor:
    """One weight of these stacked by rows (a fused QKV or gate/up); mixed formats become Q8_0."""
    if len({p.kind for p in parts}) > 1:
        parts = [p if p.kind == "q8_0" else quantize(p.dequantize(), "q8_0") for p in parts]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)
    return QuantTensor(parts[0].kind, cat([p.qs for p in parts]), cat([p.d for p in parts]), cat([p.m for p in parts]))


def quantizable(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[1] % BLOCK == 0


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).copy())


def from_gguf_blocks(raw: np.ndarray, type_name: str, rows: int, cols: int) -> QuantTensor:
    """A GGUF tensor's raw blocks (uint8 [rows, bytes per row]) in the kernels' layout."""
    nb = cols // BLOCK
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, _GGUF_BLOCK_BYTES[type_name])
    d = _f16(b[..., 0:2]).view(rows, nb)
    if type_name == "Q8_0":
        qs = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, cols))
        return QuantTensor("q8_0", qs, d, None)
    if type_name == "Q4_1":
        m = _f16(b[..., 2:4]).view(rows, nb)
        qs = torch.from_numpy(np.ascontiguousarray(b[..., 4:]).reshape(rows, cols // 2))
        return QuantTensor("q4_1", qs, d, m)
    # Q4_0: w = (q - 8) * d = q * d + (-8 d); -8 d is exact in fp16 (a power of two, far from overflow)
    qs = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).reshape(rows, cols // 2))
    return QuantTensor("q4_1", qs, d, -8 * d)


def quantize(w: torch.Tensor, kind: str) -> QuantTensor:
    """Quantize a float weight [rows, cols] (cols % 32 == 0) with llama.cpp's reference quantizer."""
    from gguf import GGMLQuantizationType, quants

    rows, cols = w.shape
    qtype = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}[kind]
    raw = quants.quantize(w.detach().float().cpu().numpy(), qtype)
    return from_gguf_blocks(raw, kind.upper(), rows, cols)
