"""Reads a GGUF file (llama.cpp's format) into a ModelConfig, HF-named fp32 weights and a tokenizer.

llama.cpp's converter permutes the rows of Q and K per head for the "llama" architecture
(to interleave rotary pairs); `_unpermute` undoes that so the weights match Hugging Face's
rotate-half RoPE. Other architectures are stored unpermuted.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from workers.errors import ModelLoadError, UnsupportedModelError
from workers.model_config import ModelConfig
from workers.progress import ProgressFn, no_progress
from workers.tokenizer import TokenizerSpec

_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(_GGUF_ARCHS)}")
    g = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=_GGUF_ARCHS[arch],
        num_layers=int(g("block_count")),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        vocab_size=int(vocab),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(g("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        name=name,
    )


def hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no counterpart in the Llama-family model")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    w2 = w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(2, 1)
    return w2.reshape(w.shape)


def unpermuted_rows(name: str, rows: int, config: ModelConfig) -> np.ndarray | None:
    """For a weight stored permuted (llama's Q and K), the row order that undoes it; else None."""
    if config.architecture != "llama" or not (".q_proj." in name or ".k_proj." in name):
        return None
    heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
    return _unpermute(np.arange(rows)[:, None], heads).ravel()


def read_weights(reader, config: ModelConfig, progress: ProgressFn = no_progress) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to fp32 under its Hugging Face name."""
    import gguf

    weights: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        order = unpermuted_rows(name, w.shape[0], config)
        if order is not None:
            w = w[order]
        weights[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a writable copy
        progress("converting GGUF tensors", i + 1, total)
    return weights


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise UnsupportedModelError(
        f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2); load this model from a Hugging Face "
        "directory with tokenizer.json instead")


def read_tokenizer(reader) -> TokenizerSpec:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (gpt2-style BPE only); load this model from a "
            "Hugging Face directory with tokenizer.json instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind_ in zip(tokens, types) if kind_ in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    tok.add_special_tokens(special)
    token_of = lambda key: tokens[int(_field(reader, key))] if _field(reader, key) is not None else None
    stops = [int(_field(reader, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
             if _field(reader, k) is not None]
    return TokenizerSpec(
        tokenizer_json=tok.to_str(),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=token_of("tokenizer.ggml.bos_token_id"),
        eos_token=token_of("tokenizer.ggml.eos_token_id"),
        stop_token_ids=tuple(dict.fromkeys(stops)),
    )


def read_gguf(path: str, name: str, progress: ProgressFn = no_progress):
    """(config, fp32 weights by HF name, tokenizer spec) of a GGUF file."""
    import gguf

    progress(f"reading {path}", 0, 0)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises IndexError, ValueError, ... on truncated files
        raise ModelLoadError(f"cannot read GGUF file {path} ({type(e).__name__}: {e}); is it complete?") from e
    try:
        config = read_config(reader, name)
        tokenizer = read_tokenizer(reader)
    except UnsupportedModelError:
        raise
    except Exception as e:  # missing or mistyped metadata
        raise ModelLoadError(f"GGUF file {path} has missing or malformed metadata ({type(e).__name__}: {e})") from e
    return config, read_weights(reader, config, progress), tokenizer

