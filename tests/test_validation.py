"""Malformed steps raise InvalidRequestError naming the request at fault, before any KV is written."""
import dataclasses

import numpy as np
import pytest

import workers
from helpers import allocated, logprobs_request, make_request, max_abs_diff, step_logprobs
from workers import InvalidRequestError, Sampler, pack_batch
from workers.step_validation import StepLimits, validate_request


def good(ex, page):
    """A valid 5-token prefill on one page, with a greedy output."""
    return make_request([10, 11, 12, 13, 14], [page], ex.info.page_size, outputs=[4], samplers=[Sampler()])


def with_(request, **changes):
    return dataclasses.replace(request, **changes)


def free_page_id(ex) -> int:
    """The id of a page that is not allocated."""
    (page,) = ex.allocate_pages(1)
    ex.free_pages([page])
    return page


# (case, how request 1 goes wrong, words the message must contain); request 0 is always valid
BAD_REQUESTS = {
    "page id out of range": (lambda ex, r: with_(r, kv_page_indices=np.array([ex.info.num_pages])), "out of range"),
    "negative page id": (lambda ex, r: with_(r, kv_page_indices=np.array([-1])), "out of range"),
    "page not allocated": (lambda ex, r: with_(r, kv_page_indices=np.array([free_page_id(ex)])), "not allocated"),
    "same page twice": (lambda ex, r: with_(r, kv_page_indices=np.array([r.kv_page_indices[0]] * 2)), "twice"),
    "position beyond the context": (lambda ex, r: with_(r, position_ids=np.arange(5) + ex.info.max_position - 4),
                                    "context"),
    "negative position": (lambda ex, r: with_(r, position_ids=np.arange(5) - 1), "context"),
    "token id beyond the vocabulary": (lambda ex, r: with_(r, token_ids=np.array([1, 2, ex.info.vocab_size, 3, 4])),
                                       "vocabulary"),
    "negative token id": (lambda ex, r: with_(r, token_ids=np.array([1, 2, -3, 3, 4])), "vocabulary"),
    "no input tokens": (lambda ex, r: with_(r, token_ids=np.zeros(0, np.int64), position_ids=np.zeros(0, np.int64),
                                           output_indices=np.zeros(0, np.int64), samplers=()), "no input tokens"),
    "no pages": (lambda ex, r: with_(r, kv_page_indices=np.zeros(0, np.int64)), "no KV pages"),
    "kv_last_page_len 0": (lambda ex, r: with_(r, kv_last_page_len=0), "kv_last_page_len"),
    "kv_last_page_len beyond the page": (lambda ex, r: with_(r, kv_last_page_len=ex.info.page_size + 1),
                                         "kv_last_page_len"),
    "fewer KV slots than input tokens": (lambda ex, r: with_(r, kv_last_page_len=3), "fewer"),
    "custom mask of the wrong length": (lambda ex, r: with_(r, attention_mask=np.ones((5, 4), bool)),
                                        "attention mask"),
    "custom mask row attending to nothing": (lambda ex, r: with_(r, attention_mask=np.tril(np.ones((5, 5), bool))
                                                                 & (np.arange(5)[:, None] != 2)), "nothing"),
}


def bad_sampler(**fields):
    return lambda ex, r: with_(r, samplers=(Sampler(**fields),))


BAD_SAMPLERS = {
    "temperature 0 for sample": (bad_sampler(kind="sample", temperature=0.0), "temperature"),
    "negative temperature for distribution": (bad_sampler(kind="distribution", top_k=3, temperature=-1.0),
                                              "temperature"),
    "top_p 0": (bad_sampler(kind="sample", top_p=0.0), "top_p"),
    "top_p above 1": (bad_sampler(kind="sample", top_p=1.5), "top_p"),
    "min_p above 1": (bad_sampler(kind="sample", min_p=1.5), "min_p"),
    "negative top_k": (bad_sampler(kind="sample", top_k=-1), "top_k"),
    "distribution without top_k": (bad_sampler(kind="distribution"), "top_k"),
    "unknown kind": (bad_sampler(kind="beam"), "kind"),
    "logprobs without token ids": (bad_sampler(kind="logprobs"), "token_ids"),
    "logprobs of a token beyond the vocabulary": (bad_sampler(kind="logprobs", token_ids=(1, 10 ** 6)), "vocabulary"),
    "logit mask of the wrong length": (lambda ex, r: with_(r, samplers=(
        Sampler(allowed=np.ones(ex.info.vocab_size - 1, bool)),)), "logit mask"),
    "logit mask not bool": (lambda ex, r: with_(r, samplers=(Sampler(allowed=np.ones(ex.info.vocab_size, np.int64)),)),
                            "logit mask"),
    "logit mask allowing nothing": (lambda ex, r: with_(r, samplers=(
        Sampler(kind="sample", allowed=np.zeros(ex.info.vocab_size, bool)),)), "allows no token"),
}

CASES = {**BAD_REQUESTS, **BAD_SAMPLERS}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_names_its_index(ex32, case):
    spoil, words = CASES[case]
    with allocated(ex32, 2) as pages:
        batch = pack_batch([good(ex32, pages[0]), spoil(ex32, good(ex32, pages[1]))])
        with pytest.raises(InvalidRequestError) as e:
            ex32.step(batch)
    assert str(e.value).startswith("request 1: "), str(e.value)
    assert e.value.request_index == 1
    assert words in str(e.value)


def test_the_good_requests_are_good(ex32):
    with allocated(ex32, 2) as pages:
        out = ex32.step(pack_batch([good(ex32, pages[0]), good(ex32, pages[1])]))
    assert out.results[0].token == out.results[1].token


def test_malformed_batch_structure_is_rejected(ex32):
    with allocated(ex32, 2) as pages:
        batch = pack_batch([good(ex32, pages[0]), good(ex32, pages[1])])
        broken = [
            dataclasses.replace(batch, position_ids=batch.position_ids[:-1]),
            dataclasses.replace(batch, qo_indptr=np.array([0, 5, 9])),
            dataclasses.replace(batch, kv_page_indptr=np.array([0, 1])),
            dataclasses.replace(batch, kv_last_page_lens=batch.kv_last_page_lens[:1]),
            dataclasses.replace(batch, output_token_indices=np.array([4, 10])),
            dataclasses.replace(batch, samplers=batch.samplers[:1]),
        ]
        for b in broken:
            with pytest.raises(InvalidRequestError):
                ex32.step(b)


def test_packed_custom_mask_shorter_than_its_offsets_is_rejected(ex32):
    """custom_mask_indptr promises 5 x 5 entries for request 1 but custom_mask holds fewer."""
    with allocated(ex32, 2) as pages:
        batch = pack_batch([good(ex32, pages[0]), with_(good(ex32, pages[1]), attention_mask=np.tril(np.ones((5, 5), bool)))])
        short = dataclasses.replace(batch, custom_mask=batch.custom_mask[:20])
        with pytest.raises(InvalidRequestError):
            ex32.step(short)


def test_sample_top_k_beyond_the_vocabulary_is_rejected_or_served(ex32):
    """Validation lets a "sample" top_k exceed the vocabulary; the step must then serve it (top_k
    meaning "all") or reject it as invalid, not fail inside sampling after writing KV."""
    s = Sampler(kind="sample", top_k=ex32.info.vocab_size + 1, seed=0)
    with allocated(ex32, 2) as pages:
        batch = pack_batch([good(ex32, pages[0]), with_(good(ex32, pages[1]), samplers=(s,))])
        try:
            out = ex32.step(batch)
        except InvalidRequestError as e:
            assert e.request_index == 1
            return
    assert 0 <= out.results[1].token < ex32.info.vocab_size


SPOILERS_FOR_NO_WRITE = ["page not allocated", "token id beyond the vocabulary", "logit mask allowing nothing",
                         "custom mask of the wrong length"]


@pytest.mark.parametrize("case", SPOILERS_FOR_NO_WRITE)
def test_bad_batch_writes_no_kv(ex32, chat_ids, case):
    """Request 0 of the bad batch would overwrite a 20-token history with other tokens; after the
    batch is refused, a decode over that history must read exactly what it read before."""
    spoil, _ = CASES[case]
    ps = ex32.info.page_size
    history, other = chat_ids[:20], chat_ids[17:37]
    with allocated(ex32, 3) as (a, b, c):
        step_logprobs(ex32, [logprobs_request(ex32, history, [a, b], outputs=[])])
        decode = lambda: step_logprobs(ex32, [logprobs_request(ex32, chat_ids[20:21], [a, b], start=20)])[0]
        before = decode()
        free_before = ex32.num_free_pages
        overwrite = make_request(other, [a, b], ps, outputs=[19], samplers=[Sampler()])
        with pytest.raises(InvalidRequestError):
            ex32.step(pack_batch([overwrite, spoil(ex32, good(ex32, c))]))
        assert ex32.num_free_pages == free_before
        after = decode()
    assert max_abs_diff(after, before) == 0  # tolerance: none; the same computation on the same KV
    ex32.check_idle_invariant()


def test_all_masked_slots_are_refused_without_writing(ex32, chat_ids):
    ps = ex32.info.page_size
    with allocated(ex32, 2) as (a, b):
        step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:ps], [a], outputs=[])])
        decode = lambda: step_logprobs(ex32, [logprobs_request(ex32, chat_ids[ps:ps + 1], [a, b], start=ps)])[0]
        before = decode()
        ex32.mask_slots(a, [True] * ps)
        ex32.mask_slots(b, [True] * ps)  # the decode's own slot too: nothing left to attend to
        overwrite = make_request(chat_ids[1:ps + 1], [a], ps, outputs=[ps - 1], samplers=[Sampler()])
        with pytest.raises(InvalidRequestError) as e:
            ex32.step(pack_batch([overwrite, make_request(chat_ids[ps:ps + 1], [a, b], ps, start=ps)]))
        assert "masked" in str(e.value)
        ex32.mask_slots(a, [False] * ps)
        ex32.mask_slots(b, [False] * ps)
        assert max_abs_diff(decode(), before) == 0  # tolerance: none, as above


def test_kv_operations_on_bad_pages(ex32):
    ps = ex32.info.page_size
    with allocated(ex32, 1) as (page,):
        spare = free_page_id(ex32)
        for call in (lambda: ex32.mask_slots(spare, [False] * ps),
                     lambda: ex32.mask_slots(page, [False] * (ps - 1)),
                     lambda: ex32.copy_slots(page, spare, 0, 0, 1),
                     lambda: ex32.copy_slots(page, page, 0, ps - 1, 2),
                     lambda: ex32.copy_slots(page, page, -1, 0, 1)):
            with pytest.raises(InvalidRequestError):
                call()
    with pytest.raises(workers.PageStateError):
        ex32.free_pages([spare])


def step_limits(ex):
    info = ex.info
    return StepLimits(info.num_pages, info.page_size, info.vocab_size, info.max_position)


# whether a page is allocated is the executor's check (the page registry's, on a worker), not the request's
ONE_REQUEST_CASES = [case for case in CASES if case != "page not allocated"]


@pytest.mark.parametrize("case", ONE_REQUEST_CASES)
def test_one_request_is_refused_as_in_a_batch(ex32, case):
    """validate_request (a worker's check of each pass as it arrives) refuses what validate_batch
    refuses, with the same words, naming the index it is given."""
    spoil, words = CASES[case]
    limits = step_limits(ex32)
    validate_request(good(ex32, 0), limits)
    with pytest.raises(InvalidRequestError) as e:
        validate_request(spoil(ex32, good(ex32, 0)), limits, index=3)
    assert str(e.value).startswith("request 3: "), str(e.value)
    assert words in str(e.value)


def test_one_request_with_malformed_arrays_is_refused(ex32):
    limits = step_limits(ex32)
    r = good(ex32, 0)
    for broken, words in [
        (with_(r, token_ids=np.array([1.5, 2, 3, 4, 5])), "integers"),
        (with_(r, kv_page_indices=np.array([[0]])), "integers"),
        (with_(r, position_ids=np.arange(4)), "position_ids"),
        (with_(r, output_indices=np.array([4, 5]), samplers=(Sampler(), Sampler())), "outside"),
        (with_(r, samplers=()), "samplers"),
    ]:
        with pytest.raises(InvalidRequestError, match=words):
            validate_request(broken, limits)
