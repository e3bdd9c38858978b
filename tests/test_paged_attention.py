"""Paged KV: results must not depend on which pages hold a sequence, their size, how a prefill is
chunked, or whether a prefix's pages are shared between requests (SmolLM2, fp32)."""
import numpy as np
import pytest

from helpers import allocated, logprobs_request, max_abs_diff, pages_needed, step_logprobs


# (page size, pages) to compare with the session's 16: the torch executor takes any size; vLLM's CPU kernels
# multiples of 16
PAGE_SIZES = {"torch": ((1, 80), (3, 40)), "vllm": ((32, 40), (48, 26))}


@pytest.fixture(scope="module")
def executors(make_executor, executor_kind, _executor_fp32):
    """fp32 SmolLM2 executors by page size, sharing the session's loaded weights."""
    made = {ps: make_executor("fp32", page_size=ps, num_pages=n) for ps, n in PAGE_SIZES[executor_kind]}
    return {**made, 16: _executor_fp32}


def run_layout(ex, ids, pages, decode_tail: int) -> np.ndarray:
    """Log-probs at every position: a prefill of all but `decode_tail` tokens, then one token per step."""
    ps, n = ex.info.page_size, len(ids)
    split = n - decode_tail
    out = step_logprobs(ex, [logprobs_request(ex, ids[:split], pages[:pages_needed(split, ps)])])[0]
    rows = [out]
    for i in range(split, n):
        rows.append(step_logprobs(ex, [logprobs_request(ex, ids[i:i + 1], pages[:pages_needed(i + 1, ps)],
                                                        start=i)])[0])
    return np.concatenate(rows)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_page_layout_does_not_change_logits(executors, chat_ids, which):
    page_size = sorted(executors)[which]
    ex = executors[page_size]
    ids = chat_ids + chat_ids  # 74 tokens: two pages or more at every size
    free_before = ex.num_free_pages
    need = pages_needed(len(ids), page_size)
    with allocated(ex, ex.num_free_pages) as pool:  # the whole cache: its lowest ids are consecutive
        contiguous = sorted(pool)[:need]
        assert contiguous == list(range(contiguous[0], contiguous[0] + need))
        scattered = sorted((int(p) for p in np.random.default_rng(page_size).permutation(pool)[:need]), reverse=True)
        assert scattered != contiguous and scattered != sorted(scattered)
        a = run_layout(ex, ids, contiguous, decode_tail=4)
        b = run_layout(ex, ids, scattered, decode_tail=4)
    assert ex.num_free_pages == free_before
    assert max_abs_diff(a, b) < 1e-5  # tolerance: 1e-5 max abs log-prob difference (measured 0: same math)


def test_page_size_does_not_change_logits(executors, chat_ids):
    results = {}
    for ps, ex in executors.items():
        with allocated(ex, pages_needed(len(chat_ids), ps)) as pages:
            results[ps] = run_layout(ex, chat_ids, pages, decode_tail=4)
    # tolerance: 1e-5 max abs log-prob difference between page sizes (same gathered keys and values)
    for ps in results:
        assert max_abs_diff(results[ps], results[16]) < 1e-5, ps


@pytest.mark.parametrize("cuts", [(10, 27), (16, 32), (1, 2, 36)])
def test_chunked_prefill_equals_one_prefill(ex32, chat_ids, cuts):
    """Chunks whose kv_last_page_len covers the history written by the earlier chunks."""
    ps, n = ex32.info.page_size, len(chat_ids)
    with allocated(ex32, pages_needed(n, ps)) as pages:
        whole = step_logprobs(ex32, [logprobs_request(ex32, chat_ids, pages)])[0]
        bounds = [0, *cuts, n]
        chunks = [step_logprobs(ex32, [logprobs_request(ex32, chat_ids[a:b], pages[:pages_needed(b, ps)],
                                                        start=a)])[0] for a, b in zip(bounds, bounds[1:])]
    # tolerance: 5e-4 max abs log-prob difference: a chunk's matmuls have fewer rows and its
    # attention a masked kernel, so fp32 rounding differs (measured <= 1.2e-4, on log-probs near -20)
    assert max_abs_diff(np.concatenate(chunks), whole) < 5e-4


def test_shared_prefix_pages_equal_separate_copies(ex32, chat_ids):
    """Two continuations of one 21-token prefix: they share its full first page; the partial
    second page is the first request's own, copied (copy_slots) into a fresh page for the second."""
    ps = ex32.info.page_size
    prefix = chat_ids[:21]  # one full page + 5 slots
    tails = [chat_ids[21:30], chat_ids[27:35]]  # two different 9- and 8-token continuations
    assert len(prefix) % ps == 5

    def continuation(pages, tail):
        return logprobs_request(ex32, tail, pages, start=len(prefix))

    with allocated(ex32, 3) as (shared, own_a, own_b):
        step_logprobs(ex32, [logprobs_request(ex32, prefix, [shared, own_a], outputs=[])])
        ex32.copy_slots(own_a, own_b, 0, 0, len(prefix) - ps)
        together = step_logprobs(ex32, [continuation([shared, own_a], tails[0]),
                                        continuation([shared, own_b], tails[1])])
    for tail, got in zip(tails, together):
        with allocated(ex32, 2) as pages:
            step_logprobs(ex32, [logprobs_request(ex32, prefix, pages, outputs=[])])
            alone = step_logprobs(ex32, [continuation(pages, tail)])[0]
        # tolerance: 5e-4 max abs log-prob difference: batched, the matmuls have more rows and
        # round differently (measured 3.4e-5)
        assert max_abs_diff(got, alone) < 5e-4
