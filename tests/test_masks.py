"""Attention masks: a custom mask hiding tokens S from every later query must equal transformers on
the sequence without S (original position ids), and slot masks (mask_slots) must equal custom masks.
SmolLM2, fp32."""
import numpy as np

from helpers import allocated, hf_logprobs, logprobs_request, max_abs_diff, pages_needed, step_logprobs

HIDDEN = sorted({14, 15, 16, 17, 18, 19, 27})  # S: part of the system prompt and one token of the question

# tolerance against transformers: 1e-3 max abs log-prob difference (measured <= 8e-5)
REF_TOL = 1e-3
# tolerance between our own two mechanisms: 5e-4 max abs log-prob difference (different kernels
# round differently; measured <= 3e-5)
SAME_TOL = 5e-4


def hiding_mask(kv_len: int, rows: range, hidden) -> np.ndarray:
    """[len(rows), kv_len]: causal, except that no query outside `hidden` sees a slot in `hidden`."""
    hidden = np.isin(np.arange(kv_len), list(hidden))
    q = np.asarray(rows)[:, None]
    j = np.arange(kv_len)[None, :]
    return (j <= q) & (~hidden[None, :] | hidden[q])


def reference_without(hf32, ids, hidden):
    kept = [i for i in range(len(ids)) if i not in set(hidden)]
    return kept, hf_logprobs(hf32, [ids[i] for i in kept], positions=kept)


def test_custom_mask_equals_reference_without_hidden_tokens(ex32, hf32, chat_ids):
    n = len(chat_ids)
    mask = hiding_mask(n, range(n), HIDDEN)
    with allocated(ex32, pages_needed(n, ex32.info.page_size)) as pages:
        masked = step_logprobs(ex32, [logprobs_request(ex32, chat_ids, pages, mask=mask)])[0]
        causal = step_logprobs(ex32, [logprobs_request(ex32, chat_ids, pages)])[0]
    kept, ref = reference_without(hf32, chat_ids, HIDDEN)
    assert max_abs_diff(masked[kept], ref) < REF_TOL
    after = [i for i in kept if i > HIDDEN[0]]
    assert max_abs_diff(masked[after], causal[after]) > 0.1  # the mask did change what follows S


def test_non_contiguous_position_ids_equal_reference(ex32, hf32, chat_ids):
    """The sequence without S, fed with its original (gapped) position ids: RoPE follows position_ids."""
    kept, ref = reference_without(hf32, chat_ids, HIDDEN)
    tokens = [chat_ids[i] for i in kept]
    with allocated(ex32, pages_needed(len(tokens), ex32.info.page_size)) as pages:
        gapped = step_logprobs(ex32, [logprobs_request(ex32, tokens, pages, positions=kept)])[0]
        contiguous = step_logprobs(ex32, [logprobs_request(ex32, tokens, pages)])[0]
    assert max_abs_diff(gapped, ref) < REF_TOL
    assert max_abs_diff(contiguous, ref) > 0.1  # the gap matters


def test_custom_mask_on_a_chunk_over_history(ex32, hf32, chat_ids):
    """History 0..19 prefilled causally (S = 14..19 ends it, so no history token saw S), then a chunk
    20..36 whose [17, 37] mask hides S and token 27 from the chunk's other tokens."""
    n, split = len(chat_ids), 20
    mask = hiding_mask(n, range(split, n), HIDDEN)
    ps = ex32.info.page_size
    with allocated(ex32, pages_needed(n, ps)) as pages:
        step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:split], pages[:pages_needed(split, ps)], outputs=[])])
        chunk = step_logprobs(ex32, [logprobs_request(ex32, chat_ids[split:], pages, start=split, mask=mask)])[0]
    kept, ref = reference_without(hf32, chat_ids, HIDDEN)
    rows = [i for i in kept if i >= split]
    assert max_abs_diff(chunk[[i - split for i in rows]], ref[[kept.index(i) for i in rows]]) < REF_TOL


def test_mask_slots_equals_custom_mask_and_unmasking_restores(ex32, hf32, chat_ids):
    """A 30-token history prefilled with S hidden from its later tokens; then a decode of token 30 and
    a chunk of tokens 30..33 hide S either by a custom mask or by mask_slots on S's slots."""
    ps = ex32.info.page_size
    n = 30
    hidden = [3, 4, 5, 17, 18]  # slots 3-5 of the first page, 1-2 of the second
    decode = lambda pages, mask=None: step_logprobs(ex32, [logprobs_request(
        ex32, chat_ids[n:n + 1], pages[:pages_needed(n + 1, ps)], start=n, mask=mask)])[0][0]
    chunk = lambda pages, mask=None: step_logprobs(ex32, [logprobs_request(
        ex32, chat_ids[n:n + 4], pages[:pages_needed(n + 4, ps)], start=n, mask=mask)])[0]
    with allocated(ex32, pages_needed(n + 4, ps)) as pages:
        step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:n], pages[:pages_needed(n, ps)], outputs=[],
                                              mask=hiding_mask(n, range(n), hidden))])
        plain = decode(pages)
        by_custom_mask = decode(pages, hiding_mask(n + 1, range(n, n + 1), hidden))
        chunk_by_custom_mask = chunk(pages, hiding_mask(n + 4, range(n, n + 4), hidden))
        for p in range(2):
            ex32.mask_slots(pages[p], [p * ps + s in hidden for s in range(ps)])
        by_slot_mask = decode(pages)
        chunk_by_slot_mask = chunk(pages)
        for p in range(2):
            ex32.mask_slots(pages[p], [False] * ps)
        unmasked = decode(pages)
    assert max_abs_diff(by_slot_mask, by_custom_mask) < SAME_TOL
    assert max_abs_diff(chunk_by_slot_mask, chunk_by_custom_mask) < SAME_TOL
    assert max_abs_diff(unmasked, plain) < SAME_TOL
    assert max_abs_diff(by_slot_mask, plain) > 0.1  # masking changed the result
    # no token after S ever saw S, so both equal transformers on the sequence without S
    kept, ref = reference_without(hf32, chat_ids[:n + 4], hidden)
    assert max_abs_diff(by_slot_mask, ref[kept.index(n)]) < REF_TOL
    assert max_abs_diff(chunk_by_slot_mask, ref[-4:]) < REF_TOL


def test_fresh_pages_come_unmasked(ex32, chat_ids):
    """allocate_pages clears slot masks left by a page's previous owner."""
    ps = ex32.info.page_size
    n = 20
    with allocated(ex32, 2) as pages:
        before = step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:n], pages, outputs=[n - 1])])[0]
        ex32.mask_slots(pages[0], [True] * 4 + [False] * (ps - 4))
    with allocated(ex32, ex32.num_free_pages) as again:  # every free page, so also the two above
        reused = [p for p in again if p in pages]
        assert sorted(reused) == sorted(pages)
        after = step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:n], pages, outputs=[n - 1])])[0]
    assert max_abs_diff(after, before) < 1e-5  # tolerance: same step on the same pages (measured 0)
