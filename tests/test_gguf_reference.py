"""SmolLM2 from the GGUF: our conversion and executor against transformers' own GGUF loader."""
import numpy as np
import pytest
import torch

from helpers import allocated, hf_logprobs, logprobs_request, max_abs_diff, pages_needed, prefill_logprobs, step_logprobs


def test_config_matches_transformers(smollm2, hf32):
    ours, ref = smollm2.config, hf32.config
    assert ours.architecture == "llama"
    assert ours.num_layers == ref.num_hidden_layers
    assert ours.hidden_size == ref.hidden_size
    assert ours.intermediate_size == ref.intermediate_size
    assert ours.num_heads == ref.num_attention_heads
    assert ours.num_kv_heads == ref.num_key_value_heads
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads
    assert ours.vocab_size == ref.vocab_size == 49152
    assert ours.rope_theta == pytest.approx(ref.rope_parameters["rope_theta"])  # exact float from the GGUF
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert ours.tie_word_embeddings


def test_weights_match_transformers_gguf_conversion(smollm2, hf32):
    """Both dequantize the same blocks; Q and K must come out un-permuted exactly as transformers does."""
    ref = hf32.state_dict()
    names = [n for n in ref if n != "lm_head.weight"]  # tied: lm_head is the embedding
    assert sorted(names) == sorted(smollm2.weights)
    for name in names:
        # tolerance: 0 — the same dequantized values, only rows reordered
        assert torch.equal(smollm2.weights[name], ref[name].float()), name


def test_fp32_prefill_logits_match_transformers(ex32, hf32, chat_ids):
    assert 30 <= len(chat_ids) <= 40
    ours = prefill_logprobs(ex32, chat_ids)
    ref = hf_logprobs(hf32, chat_ids)
    # tolerance: 1e-3 max abs log-prob difference at every position and token (measured ~8e-5)
    assert max_abs_diff(ours, ref) < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_fp32_decode_steps_match_transformers(ex32, hf32, chat_ids):
    """Prefill all but the last 5 tokens, then feed those one per step (the decode path)."""
    n, tail = len(chat_ids), 5
    ref = hf_logprobs(hf32, chat_ids)
    ps = ex32.info.page_size
    with allocated(ex32, pages_needed(n, ps)) as pages:
        history = pages[:pages_needed(n - tail, ps)]
        step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:n - tail], history, outputs=[])])
        for i in range(n - tail, n):
            used = pages[:pages_needed(i + 1, ps)]
            ours = step_logprobs(ex32, [logprobs_request(ex32, chat_ids[i:i + 1], used, start=i)])[0][0]
            # tolerance: 1e-3 max abs log-prob difference (measured ~5e-5)
            assert max_abs_diff(ours, ref[i]) < 1e-3, i


def test_bf16_agrees_with_transformers_bf16(ex16, hf16, chat_ids):
    ours = prefill_logprobs(ex16, chat_ids)
    ref = hf_logprobs(hf16, chat_ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.9  # greedy argmax at >= 90% of positions (measured 100%)
    top = np.argsort(ref, axis=-1)[:, -20:]
    ours_top, ref_top = np.take_along_axis(ours, top, -1), np.take_along_axis(ref, top, -1)
    # tolerance: bf16 rounds differently in every op; on the 20 most likely tokens the log-probs
    # stay within 1.5 (measured max 0.53), over the whole vocabulary within 0.5 on average (measured 0.13)
    assert max_abs_diff(ours_top, ref_top) < 1.5
    assert np.abs(ours - ref).mean() < 0.5


TOKENIZER_STRINGS = [
    "12345",
    "a1b22c333 and 3.14159",
    "héllo wörld ünïcode 日本語 🙂",
    "def f(x):\n    return x**2  # square\n",
    "  leading spaces",
    "\t\ttabs and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_transformers_gguf_tokenizer(ex32, hf_tokenizer, text):
    ours = ex32.tokenizer.encode(text)
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ex32.tokenizer.decode(ours) == text
    assert hf_tokenizer.decode(ours) == text


def test_special_tokens_and_stop_ids(ex32, hf_tokenizer):
    tok = ex32.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok.encode(special) == [hf_tokenizer.convert_tokens_to_ids(special)]
    assert hf_tokenizer.eos_token_id in ex32.info.stop_token_ids
    assert tok.vocab_size == len(hf_tokenizer) == ex32.info.vocab_size


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ex32, hf_tokenizer, messages, add_generation_prompt):
    ours = ex32.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
