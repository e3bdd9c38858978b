"""Which of a model's weights `--quant` quantizes, and how; cached beside the converted weights.

- int4: the decoder layers' linear weights as Q4_1, the token embedding (and an untied LM
  head) as Q8_0, as llama.cpp's Q4 files do: the 49k-row head is where 4 bits cost the most.
- int8: all of those as Q8_0.
A GGUF file's Q4_0 / Q4_1 / Q8_0 blocks are taken as they are (int4), or Q8_0 ones (int8):
no float round trip. Any other weight is quantized from the fp32 weights with gguf's reference
quantizers. Norms, biases and rotary tables stay in the model's dtype.

The result is written to the model's weight-cache entry (quant-<mode>-v<N>.safetensors) when
it has one, so the next load reads it in well under a second.
"""
from __future__ import annotations

import os
import re

import torch

from workers.errors import ModelLoadError
from workers.model_loader import LoadedModel
from workers.progress import ProgressFn, StderrProgress
from workers.quant.blocks import GGUF_TYPES, QuantTensor, from_gguf_blocks, quantizable, quantize

QUANT_VERSION = 2  # bump when the layout or the choice of formats changes
_LAYER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def target_kind(name: str, quant: str) -> str | None:
    """The block format `quant` gives weight `name`, or None when it stays a float tensor."""
    if quant == "none" or not (_LAYER_LINEAR.fullmatch(name) or name in _TABLES):
        return None
    return "q4_1" if quant == "int4" and name not in _TABLES else "q8_0"


def _gguf_blocks(model: LoadedModel, quant: str) -> dict[str, QuantTensor]:
    """The GGUF file's own blocks for every weight whose stored format `quant` takes as it is."""
    if not model.source.endswith(".gguf"):
        return {}
    import gguf

    from workers.gguf_reader import hf_name, unpermuted_rows

    usable = {"int4": set(GGUF_TYPES), "int8": {"Q8_0"}}[quant]
    out = {}
    for t in gguf.GGUFReader(model.source).tensors:
        name = hf_name(t.name)
        if t.tensor_type.name not in usable or target_kind(name, quant) is None:
            continue
        if name in _TABLES and t.tensor_type.name != "Q8_0":
            continue  # 4-bit tables are re-made as Q8_0 from the float weights: see the module doc
        cols, rows = (int(n) for n in t.shape)
        qt = from_gguf_blocks(t.data, t.tensor_type.name, rows, cols)
        order = unpermuted_rows(name, rows, model.config)
        out[name] = qt if order is None else qt.take_rows(order)
    return out


def _cache_file(model: LoadedModel, quant: str) -> str | None:
    return os.path.join(model.cache_dir, f"quant-{quant}-v{QUANT_VERSION}.safetensors") if model.cache_dir else None


def _load_cached(path: str | None) -> dict[str, QuantTensor] | None:
    if path is None or not os.path.exists(path):
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception:  # truncated or foreign: quantize again
        return None
    names = {k.rsplit(".", 2)[0] for k in tensors}
    return {n: QuantTensor.from_tensors(tensors, n) for n in names}


def _store(path: str | None, weights: dict[str, QuantTensor]) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for name, qt in weights.items() for k, v in qt.tensors(name).items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs the next load a re-quantization, nothing more
        if os.path.exists(tmp):
            os.remove(tmp)


def quant_weights(model: LoadedModel, quant: str, device: torch.device,
                  progress: ProgressFn | None = None) -> dict[str, QuantTensor] | None:
    """{HF weight name: QuantTensor} for `quant` ("int8" or "int4"), or None for "none"."""
    if quant == "none":
        return None
    if device.type != "cpu":
        raise ModelLoadError(f"--quant {quant} runs on CPU kernels only; use --quant none on {device.type}")
    progress = progress or StderrProgress("quant")
    from workers.quant import kernels

    kernels.load(progress)  # build (or find) the kernels first: a missing compiler fails before any work
    path = _cache_file(model, quant)
    cached = _load_cached(path)
    if cached is not None:
        return cached
    out = _gguf_blocks(model, quant)
    todo = [n for n, w in model.weights.items()
            if n not in out and target_kind(n, quant) is not None and quantizable(tuple(w.shape))]
    for i, name in enumerate(todo):
        out[name] = quantize(model.weights[name], target_kind(name, quant))
        progress(f"quantizing weights to {quant}", i + 1, len(todo))
    _store(path, out)
    return out

