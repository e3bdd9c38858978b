"""The torch executor on CUDA against the same executor on the CPU, both fp32 (SmolLM2): a ragged
batch of prefills and decodes, paged attention over scattered pages with a decode tail, a custom
attention mask; then one inferlet end to end on a CUDA executor. Skipped without a CUDA device.

The CPU side is the session's executor (tests/conftest.py), whose own tests hold it against
transformers; here the same requests run on both and their log-probabilities are compared.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import workers
from cluster.runtime.inferlet_host import InferletHost
from helpers import allocated, logprobs_request, max_abs_diff, pages_needed, settled, step_logprobs
from test_masks import HIDDEN, hiding_mask
from test_paged_attention import run_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_PAGES = 96  # as the CPU executor's
# tolerance, CUDA against CPU: 2e-3 max abs log-prob difference. Both are fp32 (no TF32: torch leaves
# it off for matmuls), but the kernels sum in other orders; the CPU side's own batched-vs-alone
# rounding is 5e-4 (tests/test_batching.py)
CUDA_TOL = 2e-3
TEXT = Path(__file__).resolve().parents[2] / "inferlets" / "examples" / "text_completion.py"


@pytest.fixture(scope="module")
def _executor_cuda(smollm2):
    return workers.TorchExecutor(smollm2, dtype="fp32", device="cuda", page_size=16, num_pages=NUM_PAGES)


@pytest.fixture
def cuda32(_executor_cuda):
    """SmolLM2 in fp32 on CUDA, 16-slot pages; checked for leaked pages per test, as ex32 is."""
    free_before = _executor_cuda.num_free_pages
    yield _executor_cuda
    _executor_cuda.check_idle_invariant()
    assert _executor_cuda.num_free_pages == free_before, "the test left KV pages allocated"


def ragged_batch(ex, ids: np.ndarray) -> list[np.ndarray]:
    """Three decodes continuing histories of 20, 33 and 5 tokens, interleaved with two fresh prefills
    of 7 and 26 tokens (outputs at three of their positions), in one step; each request's log-probs."""
    ps = ex.info.page_size
    histories, prefills = [ids[:20], ids[4:37], ids[10:15]], [ids[30:37], ids[3:29]]
    with allocated(ex, 12) as pool:
        pages, k = [], 0
        for n in [len(h) + 1 for h in histories] + [len(p) for p in prefills]:
            pages.append(pool[k:k + pages_needed(n, ps)])
            k += pages_needed(n, ps)
        for h, p in zip(histories, pages):
            step_logprobs(ex, [logprobs_request(ex, h, p, outputs=[])])
        decodes = [logprobs_request(ex, [int(ids[7 * j])], p, start=len(h))
                   for j, (h, p) in enumerate(zip(histories, pages))]
        fresh = [logprobs_request(ex, seq, p, outputs=[0, len(seq) // 2, len(seq) - 1])
                 for seq, p in zip(prefills, pages[3:])]
        return step_logprobs(ex, [decodes[0], fresh[0], decodes[1], fresh[1], decodes[2]])


def test_a_ragged_batch_on_cuda_equals_the_cpu(ex32, cuda32, chat_ids):
    ids = np.asarray(chat_ids)
    for i, (gpu, cpu) in enumerate(zip(ragged_batch(cuda32, ids), ragged_batch(ex32, ids))):
        assert gpu.shape == cpu.shape and max_abs_diff(gpu, cpu) < CUDA_TOL, f"request {i}"


def test_paged_attention_over_scattered_pages_on_cuda_equals_the_cpu(ex32, cuda32, chat_ids):
    need = pages_needed(len(chat_ids), 16)
    results = []
    for ex in (cuda32, ex32):
        with allocated(ex, ex.num_free_pages) as pool:  # scattered over the whole cache, not in order
            scattered = [int(p) for p in np.random.default_rng(0).permutation(pool)[:need]]
            results.append(run_layout(ex, chat_ids, scattered, decode_tail=4))  # a prefill, then 4 decodes
    assert max_abs_diff(*results) < CUDA_TOL


def test_a_custom_mask_on_cuda_equals_the_cpu(ex32, cuda32, chat_ids):
    n = len(chat_ids)
    mask = hiding_mask(n, range(n), HIDDEN)
    results = {}
    for name, ex in (("cuda", cuda32), ("cpu", ex32)):
        with allocated(ex, pages_needed(n, 16)) as pages:
            results[name] = step_logprobs(ex, [logprobs_request(ex, chat_ids, pages, mask=mask)])[0]
            results[name + " causal"] = step_logprobs(ex, [logprobs_request(ex, chat_ids, pages)])[0]
    assert max_abs_diff(results["cuda"], results["cpu"]) < CUDA_TOL
    assert max_abs_diff(results["cuda causal"], results["cpu causal"]) < CUDA_TOL
    after = list(range(HIDDEN[0] + 1, n))
    assert max_abs_diff(results["cuda"][after], results["cuda causal"][after]) > 0.1  # the mask mattered on CUDA


def test_an_inferlet_on_a_cuda_executor(ex32, cuda32):
    args = ["--prompt", "What is the capital of France?", "--max-tokens", "8"]
    answers = {}
    for name, ex in (("cuda", cuda32), ("cpu", ex32)):
        with InferletHost(ex) as host:
            outcome = host.run(TEXT, args)
            assert outcome.ok, (name, outcome.error)
            answers[name] = "".join(outcome.messages)
            settled(host)  # its last pages are back before the fixture counts them
    assert "Paris" in answers["cuda"] and answers["cuda"] == answers["cpu"], answers  # greedy, fp32 on both
