"""Quantized CPU linears (issue 19): bit-exact blocks, kernels against torch, the model against transformers.

References: gguf's own dequantization (the Python port of llama.cpp's) for the blocks;
x @ W.T in torch over the dequantized weight (fp32 activations) or over the 8-bit-quantized
activations (the a8 path) for the kernels; transformers in fp32 on the same GGUF for the model.
"""
import gguf
import numpy as np
import pytest
import torch

import workers
from helpers import allocated, hf_logprobs, logprobs_request, max_abs_diff, pages_needed, prefill_logprobs, step_logprobs
from workers.errors import ModelLoadError
from workers.quant import kernels
from workers.quant.blocks import QuantTensor, cat_rows, from_gguf_blocks, quantize
from workers.quant.linear import DENSE_FROM, QuantEmbedding, QuantLinear
from workers.quant.model_weights import quant_weights, target_kind

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime."]


@pytest.fixture(scope="module")
def k():
    return kernels.load()


def _weight(rows: int, cols: int, kind: str, seed: int = 0) -> QuantTensor:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(rows, cols, generator=g) * 0.05, kind)


def _a8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x quantized per block of 32 as the kernel does (q = round(x / dx), dx = max|x| / 127), times W.T."""
    blocks = x.view(x.shape[0], x.shape[1] // 32, 32)
    dx = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(dx > 0, torch.round(blocks / torch.where(dx > 0, dx, 1)), 0)
    return (q * dx).view_as(x) @ w.T


# ---- blocks: bit-exact against llama.cpp's dequantization ----

def test_gguf_blocks_unpack_bit_exact_to_gguf_dequantization(smollm2, k):
    reader = gguf.GGUFReader(smollm2.source)
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0") or kind in seen:
            continue
        cols, rows = (int(n) for n in t.shape)
        qt = from_gguf_blocks(t.data, kind, rows, cols)
        ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(qt.dequantize(), ref), t.name  # tolerance: 0, the same values
        some = torch.tensor([0, rows // 2, rows - 1])
        assert torch.equal(k.rows(qt.qs, qt.d, qt.m, some), ref[some]), t.name  # the kernel's unpacking too
        seen.add(kind)
    assert seen == {"Q4_1", "Q8_0"}


def test_q4_0_blocks_become_exact_q4_1():
    w = torch.randn(8, 64).numpy()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    qt = from_gguf_blocks(raw, "Q4_0", 8, 64)
    assert qt.kind == "q4_1" and np.array_equal(qt.dequantize().numpy(), ref)


def test_model_weights_are_the_files_own_blocks(smollm2):
    """int4 takes every Q4_1 layer weight and the Q8_0 embedding as they are (un-permuted for Q and K)."""
    q4 = quant_weights(smollm2, "int4", torch.device("cpu"))
    assert {target_kind(n, "int4") for n in q4} == {"q4_1", "q8_0"}
    assert q4["model.embed_tokens.weight"].kind == "q8_0"
    for name, qt in q4.items():
        assert qt.kind == target_kind(name, "int4")
        assert torch.equal(qt.dequantize(), smollm2.weights[name]), name  # tolerance: 0
    q8 = quant_weights(smollm2, "int8", torch.device("cpu"))
    assert q8.keys() == q4.keys() and {qt.kind for qt in q8.values()} == {"q8_0"}


def test_quantized_weights_are_cached_beside_the_converted_ones(smollm2):
    first = quant_weights(smollm2, "int4", torch.device("cpu"))
    again = quant_weights(smollm2, "int4", torch.device("cpu"))  # from the cache entry's quant-int4-v<N>.safetensors
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name].qs, again[name].qs) and torch.equal(first[name].d, again[name].d), name


def test_quant_on_cuda_is_refused_naming_the_fix(smollm2):
    with pytest.raises(ModelLoadError, match="--quant none"):
        quant_weights(smollm2, "int4", torch.device("cuda"))


def test_mixed_formats_stack_as_q8_0():
    a, b = _weight(4, 64, "q4_1"), _weight(2, 64, "q8_0", seed=1)
    both = cat_rows([a, b])
    assert both.kind == "q8_0" and both.shape == (6, 64)
    ref = torch.cat([a.dequantize(), b.dequantize()])
    # tolerance: re-quantizing Q4_1 values to Q8_0 moves each by at most half a Q8_0 step
    step = ref.view(6, 2, 32).abs().amax(-1, keepdim=True) / 127
    assert ((both.dequantize() - ref).view(6, 2, 32).abs() <= step / 2 + 1e-7).all()


# ---- kernels against torch ----

@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 17, DENSE_FROM + 3])
def test_kernel_matches_the_dequantized_matmul(k, kind, rows):
    w = _weight(70, 96, kind)  # 70 rows: not a multiple of the 4-row tile
    x = torch.randn(rows, 96)
    ref = x @ w.dequantize().T
    y = k.linear(x, w.qs, w.d, w.m, False)
    # tolerance: fp32 summation order only (|y| ~ 0.5 here)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4])
def test_a8_kernel_is_the_matmul_of_8_bit_activations(k, kind, rows):
    w = _weight(70, 96, kind)
    x = torch.randn(rows, 96) * 3
    y = k.linear(x, w.qs, w.d, w.m, True)
    if not k.has_avx2():
        pytest.skip("this CPU has no AVX2: the a8 path is not compiled in, fp32 runs instead")
    # tolerance: fp32 summation order; the activation rounding is in the reference
    assert torch.allclose(y, _a8_reference(x, w.dequantize()), atol=1e-4, rtol=1e-4)
    assert rows == 0 or not torch.allclose(y, x @ w.dequantize().T, atol=1e-5, rtol=1e-5)  # it did round


def test_quant_linear_keeps_shape_dtype_and_bias():
    w = _weight(40, 64, "q4_1")
    bias = torch.randn(40)
    for rows, a8 in ((3, False), (9, True), (DENSE_FROM, True)):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        y = QuantLinear(w, bias, a8=a8)(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 40)
        ref = x.float() @ w.dequantize().T + bias
        # tolerance: the bf16 output rounding (2^-8 relative) dominates
        assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_bad_inputs_are_refused_not_read_out_of_bounds(k):
    w = _weight(8, 64, "q8_0")
    with pytest.raises(RuntimeError, match="out of range"):
        QuantEmbedding(w, torch.float32)(torch.tensor([8]))
    with pytest.raises(RuntimeError, match=r"\[tokens, 64\]"):
        k.linear(torch.randn(2, 32), w.qs, w.d, w.m, False)
    with pytest.raises(RuntimeError, match="qs must be contiguous"):
        k.linear(torch.randn(2, 64), w.qs[:, :32], w.d, w.m, False)


# ---- the model against transformers in fp32 (same GGUF) ----

@pytest.fixture(scope="module", params=["int8", "int4"])
def exq(request, smollm2):
    ex = workers.TorchExecutor(smollm2, dtype="fp32", page_size=16, num_pages=64, quant=request.param)
    assert ex.info.quant == request.param
    yield ex
    assert ex.num_free_pages == ex.info.num_pages


def _prompt(ex, text):
    tok = ex.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def _top20(ours: np.ndarray, ref: np.ndarray) -> float:
    top = np.argsort(ref, axis=-1)[..., -20:]
    return max_abs_diff(np.take_along_axis(ours, top, -1), np.take_along_axis(ref, top, -1))


def _agree(ours: np.ndarray, ref: np.ndarray, tie: float) -> bool:
    """Our top token is the reference's, or within `tie` of it in the reference's log-probs (a near tie)."""
    pick = ours.argmax(-1)
    return bool((np.take_along_axis(ref, pick[..., None], -1)[..., 0] >= ref.max(-1) - tie).all())


# Measured on SmolLM2-135M (3 prompts; max over positions of the top-20 |log-prob difference|):
# prefill (fp32 activations): int4 4e-5 (the file's own Q4_1 weights: only summation order
# differs), int8 0.67 (the Q4_1 weights re-quantized to Q8_0; argmax agreement 95-98%);
# decode steps (8-bit activations in the layers): int4 0.57, int8 0.96. For scale: our bf16
# executor is 0.53 off on prefill (test_gguf_reference). A top token that differs from the
# reference's must be within the tolerance of it in the reference's own log-probs (a near tie).
PREFILL_TOL = {"int4": 1e-3, "int8": 1.5}
DECODE_TOL = {"int4": 1.5, "int8": 1.5}


def test_quantized_prefill_matches_transformers(exq, hf32):
    for text in PROMPTS:
        ids = _prompt(exq, text)
        ours, ref = prefill_logprobs(exq, ids), hf_logprobs(hf32, ids)
        assert _top20(ours, ref) < PREFILL_TOL[exq.info.quant], text
        assert _agree(ours, ref, tie=PREFILL_TOL[exq.info.quant]), text


def test_quantized_decode_steps_match_transformers(exq, hf32):
    """One token per step: the decode path, with 8-bit activations in the layers."""
    for text in PROMPTS:
        ids = _prompt(exq, text)
        n, tail = len(ids), 6
        ref = hf_logprobs(hf32, ids)
        ps = exq.info.page_size
        with allocated(exq, pages_needed(n, ps)) as pages:
            step_logprobs(exq, [logprobs_request(exq, ids[:n - tail], pages[:pages_needed(n - tail, ps)], outputs=[])])
            for i in range(n - tail, n):
                ours = step_logprobs(exq, [logprobs_request(exq, ids[i:i + 1], pages[:pages_needed(i + 1, ps)],
                                                            start=i)])[0][0]
                assert _top20(ours, ref[i]) < DECODE_TOL[exq.info.quant], (text, i)
                assert _agree(ours, ref[i], tie=DECODE_TOL[exq.info.quant]), (text, i)


def test_quantized_model_answers_the_default_question(exq):
    from workers.decode_loop import generate

    ids = _prompt(exq, "What is the capital of France?")
    out = generate(exq, [ids], 10, stop_token_ids=())
    assert "Paris" in exq.tokenizer.decode(list(out[0]))
