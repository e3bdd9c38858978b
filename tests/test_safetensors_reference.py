"""Tiny random-weight Hugging Face models (safetensors directories) against transformers.

Each case saves a transformers model of one architecture, with weights randomized so that every
part (biases, q/k norms, an untied head, RoPE settings) changes the output, and a word-level
tokenizer.json; workers.load_model reads the directory back and our executor must reproduce
transformers' logits at every position, through a prefill and through single-token decodes.
"""
import copy
import dataclasses
import os

import numpy as np
import pytest
import tokenizers
import torch

import workers
from workers.tokenizer import Tokenizer
from helpers import (TINY_TEXT, allocated, build_tiny_model, hf_logprobs, logprobs_request, max_abs_diff,
                     pages_needed, prefill_logprobs, step_logprobs)

PAGE_SIZE = 4  # small pages: the 20-token text spans five of them

CASES = {
    "qwen2": dict(model_type="qwen2"),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", head_dim=32),  # q/k RMSNorm, head_dim != hidden / heads
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "llama-tied-llama3-rope": dict(model_type="llama", tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    """(our LoadedModel, the transformers model, the text's token ids) for one architecture."""
    directory = str(tmp_path_factory.mktemp(request.param))
    hf = build_tiny_model(directory, seed=len(request.param), **CASES[request.param])
    loaded = workers.load_model(directory, progress=lambda *a: None)
    ids = Tokenizer(loaded.tokenizer).encode(TINY_TEXT)
    reference_ids = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).encode(TINY_TEXT).ids
    assert ids == reference_ids
    return loaded, hf, ids


def test_loaded_config_and_tokenizer(tiny):
    loaded, hf, ids = tiny
    c, ref = loaded.config, hf.config
    assert c.architecture == ref.model_type
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        ref.num_hidden_layers, ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads, ref.vocab_size)
    assert c.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert c.rope_theta == ref.rope_parameters["rope_theta"]
    assert c.vocab_size >= Tokenizer(loaded.tokenizer).vocab_size
    assert 0 not in ids  # every word is in the vocabulary: no [UNK]
    assert len(ids) == len(TINY_TEXT.split())


def test_fp32_logits_match_transformers(tiny):
    loaded, hf, ids = tiny
    ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=PAGE_SIZE, num_pages=16)
    ref = hf_logprobs(hf, ids)
    assert ref.std(axis=-1).mean() > 0.5  # the random weights give non-trivial logits to compare
    # tolerance: 1e-4 max abs log-prob difference at every position (fp32 rounding only)
    assert max_abs_diff(prefill_logprobs(ex, ids), ref) < 1e-4

    # the same sequence fed one token per step after a 5-token prefill (the decode path)
    n = len(ids)
    with allocated(ex, pages_needed(n, PAGE_SIZE)) as pages:
        step_logprobs(ex, [logprobs_request(ex, ids[:5], pages[:pages_needed(5, PAGE_SIZE)], outputs=[])])
        for i in range(5, n):
            out = step_logprobs(ex, [logprobs_request(ex, ids[i:i + 1], pages[:pages_needed(i + 1, PAGE_SIZE)],
                                                      start=i)])[0][0]
            assert max_abs_diff(out, ref[i]) < 1e-4, i  # tolerance: 1e-4, as above


def test_bf16_error_no_worse_than_transformers_bf16(tiny):
    """bf16 error is judged against transformers' own bf16 error, both measured from fp32."""
    loaded, hf, ids = tiny
    ex = workers.TorchExecutor(loaded, dtype="bf16", page_size=PAGE_SIZE, num_pages=16)
    exact = hf_logprobs(hf, ids)
    ref = hf_logprobs(copy.deepcopy(hf).to(torch.bfloat16), ids)
    ours = prefill_logprobs(ex, ids)
    # tolerance: our max abs log-prob error from fp32 is at most twice transformers' bf16 error + 0.02
    # (measured: ours 0.03-0.32, transformers 0.03-0.43, larger for the tied case's large logits)
    assert max_abs_diff(ours, exact) <= 2 * max_abs_diff(ref, exact) + 0.02
    assert np.abs(ours - exact).mean() <= 2 * np.abs(ref - exact).mean() + 0.005  # same, on the mean
    # greedy agreement with fp32 within 10 points of transformers bf16's (measured: equal)
    assert (ours.argmax(-1) == exact.argmax(-1)).mean() >= (ref.argmax(-1) == exact.argmax(-1)).mean() - 0.1


# Configurations transformers runs differently from plain Llama: loading must either reproduce
# transformers or refuse the model (UnsupportedModelError), never silently compute something else.
# (Capping the context so that no sequence can reach the difference counts as reproducing.)
UNUSUAL = {
    "llama-attention-bias": dict(model_type="llama", attention_bias=True),  # q/k/v *and* o_proj biases
    "llama-mlp-bias": dict(model_type="llama", mlp_bias=True),  # gate/up/down biases
    "mistral-sliding-window": dict(model_type="mistral", sliding_window=8),  # attend to the last 8 only
}


@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_unusual_config_is_reproduced_or_refused(case, tmp_path):
    hf = build_tiny_model(str(tmp_path), **UNUSUAL[case])
    try:
        loaded = workers.load_model(str(tmp_path), progress=lambda *a: None)
        ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=PAGE_SIZE, num_pages=16)
    except workers.UnsupportedModelError:
        return
    ids = Tokenizer(loaded.tokenizer).encode(TINY_TEXT)[:ex.info.max_position]
    # tolerance: 1e-4 max abs log-prob difference, as for the supported architectures
    assert max_abs_diff(prefill_logprobs(ex, ids), hf_logprobs(hf, ids)) < 1e-4


def test_a_sliding_window_caps_the_context_where_the_window_starts_to_matter(tmp_path):
    """Attention here is never windowed: a sliding-window model is reproduced over its whole window,
    and refused, naming the window, one position past it, where transformers starts to differ."""
    window = 8
    hf = build_tiny_model(str(tmp_path / "windowed"), model_type="mistral", sliding_window=window)
    full = build_tiny_model(str(tmp_path / "full"), model_type="mistral", sliding_window=None)  # same weights
    loaded = workers.load_model(str(tmp_path / "windowed"), progress=lambda *a: None)
    assert (loaded.config.max_position, loaded.config.sliding_window) == (window, window)
    ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=PAGE_SIZE, num_pages=16)
    ids = Tokenizer(loaded.tokenizer).encode(TINY_TEXT)
    assert len(ids) > window
    # tolerance: 1e-4 max abs log-prob difference, as for the supported architectures, at every position
    # the window allows
    assert max_abs_diff(prefill_logprobs(ex, ids[:window]), hf_logprobs(hf, ids[:window])) < 1e-4
    past = ids[:window + 1]  # one token more: the last one no longer sees the first
    assert max_abs_diff(hf_logprobs(hf, past)[window], hf_logprobs(full, past)[window]) > 1e-2
    with allocated(ex, pages_needed(len(past), PAGE_SIZE)) as pages:
        with pytest.raises(workers.InvalidRequestError, match=f"position {window} is beyond the model's context "
                                                              f"\\[0, {window}\\): .*sliding window of {window}"):
            step_logprobs(ex, [logprobs_request(ex, past, pages)])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_at_load_the_model_computes_with_exactly_its_quantized_weights(tiny, quant):
    """--quant on a safetensors model quantizes its float weights at load (gguf's reference
    quantizers); the quantized executor must be the float model with those weights, for every
    architecture (biases, q/k norms, untied heads), and they must differ from the float ones."""
    from workers.quant.model_weights import target_kind

    loaded, hf, ids = tiny
    ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=PAGE_SIZE, num_pages=16, quant=quant)
    quantized = ex.model.quantized
    linears = {n for n in loaded.weights if target_kind(n, quant)}
    assert set(quantized) == linears and any("layers.1.mlp.down_proj" in n for n in linears)
    for name, qt in quantized.items():
        assert qt.kind == target_kind(name, quant), name
    same = dataclasses.replace(loaded, weights={**loaded.weights, **{n: qt.dequantize() for n, qt in quantized.items()}})
    reference = workers.TorchExecutor(same, dtype="fp32", page_size=PAGE_SIZE, num_pages=16)
    expected = prefill_logprobs(reference, ids)
    # tolerance: 1e-4, fp32 summation order only (a prefill multiplies in fp32 on the unpacked blocks)
    assert max_abs_diff(prefill_logprobs(ex, ids), expected) < 1e-4
    assert max_abs_diff(expected, hf_logprobs(hf, ids)) > 1e-3  # quantizing did change the model
