"""GGUF files of Qwen2 and Qwen3 (stored unpermuted, unlike llama), written by the test itself.

A tiny random transformers model is exported tensor by tensor with gguf.GGUFWriter, under
llama.cpp's names, together with a byte-level BPE vocabulary in the metadata; our GGUF reader
must load it into a model whose logits equal transformers' on the original weights.
"""
import os

import numpy as np
import pytest

import workers
from helpers import build_tiny_model, hf_logprobs, max_abs_diff, prefill_logprobs

# llama.cpp tensor names for the Hugging Face ones our reader maps back
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{_LAYER[rest]}.{kind}"
    return f"{_GLOBAL[stem]}.{kind}"


def _byte_level_vocab(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): the 256 byte symbols, two merges, an end token, padding."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet) + ["Ġt", "he", "<|im_end|>"]
    tokens += [f"<pad{i}>" for i in range(vocab_size - len(tokens))]
    types = [1] * 258 + [3] * (vocab_size - 258)  # 3: control tokens, matched as wholes
    return tokens, ["Ġ t", "h e"], types


def write_gguf(path: str, hf_model, arch: str) -> None:
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, merges, types = _byte_level_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w.add_tensor(_gguf_name(name), tensor.float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def gguf_case(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(f"gguf-{request.param}"))
    hf = build_tiny_model(directory, request.param, seed=7, vocab_size=300, tie_word_embeddings=False)
    path = os.path.join(directory, "tiny.gguf")
    write_gguf(path, hf, request.param)
    return workers.load_model(path, progress=lambda *a: None), hf


def test_gguf_config_matches_the_model(gguf_case):
    loaded, hf = gguf_case
    c = loaded.config
    assert c.architecture == hf.config.model_type
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.num_attention_heads,
        hf.config.num_key_value_heads, hf.config.head_dim, hf.config.vocab_size)
    assert c.qkv_bias == (c.architecture == "qwen2") and c.qk_norm == (c.architecture == "qwen3")
    assert not c.tie_word_embeddings


def test_gguf_tokenizer_from_metadata(gguf_case):
    loaded, _ = gguf_case
    tok = workers.TorchExecutor(loaded, dtype="fp32", num_pages=4).tokenizer
    ids = tok.encode("the tea<|im_end|>")
    assert tok.decode(ids) == "the tea<|im_end|>"
    assert tok.vocabulary()["Ġt"] in ids  # the merge " t" applied
    assert ids[-1] == tok.vocabulary()["<|im_end|>"] and tok.stop_token_ids == (ids[-1],)


def test_gguf_logits_match_transformers(gguf_case):
    loaded, hf = gguf_case
    ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=4, num_pages=16)
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, 23)
    ours = prefill_logprobs(ex, tokens)
    # fp32 on both sides, same weights: only summation order differs
    assert max_abs_diff(ours, hf_logprobs(hf, tokens)) < 1e-4
    ex.check_idle_invariant()
