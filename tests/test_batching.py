"""One step over many requests equals each request stepped alone (SmolLM2, fp32)."""
import numpy as np

from helpers import (allocated, full_logprobs, logprobs_request, make_request, max_abs_diff, pages_needed,
                     step_logprobs)
from workers import Sampler, StepBatch

# tolerance for batched-vs-alone comparisons: 5e-4 max abs log-prob difference; the batch's matmuls
# have more rows and round differently in fp32 (measured <= 5e-5 on log-probs near -20)
BATCH_TOL = 5e-4


def test_mixed_prefill_and_decode_batch_equals_each_alone(ex32, chat_ids):
    ps = ex32.info.page_size
    ids = np.asarray(chat_ids)
    # decodes continue histories of 20, 33 and 5 tokens; prefills are fresh sequences of 7 and 26 tokens
    histories = [ids[:20], ids[4:37], ids[10:15]]
    prefills = [ids[30:37], ids[3:29]]
    with allocated(ex32, 12) as pool:
        pages, k = [], 0
        for n in [len(h) + 1 for h in histories] + [len(p) for p in prefills]:
            pages.append(pool[k:k + pages_needed(n, ps)])
            k += pages_needed(n, ps)
        for h, p in zip(histories, pages):
            step_logprobs(ex32, [logprobs_request(ex32, h, p, outputs=[])])
        decodes = [logprobs_request(ex32, [int(ids[7 * j])], p, start=len(h))
                   for j, (h, p) in enumerate(zip(histories, pages))]
        fresh = [logprobs_request(ex32, seq, p, outputs=[0, len(seq) // 2, len(seq) - 1])
                 for seq, p in zip(prefills, pages[3:])]
        # interleaved: decode, prefill, decode, prefill, decode
        order = [decodes[0], fresh[0], decodes[1], fresh[1], decodes[2]]
        together = step_logprobs(ex32, order)
        alone = [step_logprobs(ex32, [r])[0] for r in order]
    for i, (got, want) in enumerate(zip(together, alone)):
        assert got.shape == want.shape
        assert max_abs_diff(got, want) < BATCH_TOL, f"request {i}"


def test_decode_batch_of_different_lengths_equals_each_alone(ex32, chat_ids):
    """Only decodes: the padded decode path with kv lengths 1, 17 and 36."""
    ps = ex32.info.page_size
    with allocated(ex32, 6) as pool:
        requests = []
        for n, pages in [(0, pool[:1]), (16, pool[1:3]), (35, pool[3:6])]:
            if n:
                step_logprobs(ex32, [logprobs_request(ex32, chat_ids[:n], pages[:pages_needed(n, ps)], outputs=[])])
            requests.append(logprobs_request(ex32, [chat_ids[n]], pages, start=n))
        together = step_logprobs(ex32, requests)
        alone = [step_logprobs(ex32, [r])[0] for r in requests]
    for got, want in zip(together, alone):
        assert max_abs_diff(got, want) < BATCH_TOL


def test_outputs_only_where_asked_and_in_order(ex32, chat_ids):
    """Requests with 0, 2 and 4 outputs; output_token_indices given out of order across requests."""
    ps, vocab = ex32.info.page_size, ex32.info.vocab_size
    seqs = [chat_ids[:9], chat_ids[9:20], chat_ids[20:37]]
    with allocated(ex32, 4) as pool:
        pages = [pool[:1], pool[1:2], pool[2:4]]
        reference = [step_logprobs(ex32, [logprobs_request(ex32, s, p)])[0] for s, p in zip(seqs, pages)]
        requests = [make_request(s, p, ps) for s, p in zip(seqs, pages)]
        base = np.cumsum([0] + [len(s) for s in seqs])
        # (request, index in request): none from request 0, two from 1, four from 2, interleaved
        wanted = [(2, 16), (1, 0), (2, 3), (1, 10), (2, 0), (2, 3)]
        sampler = full_logprobs(vocab)
        batch = StepBatch(
            token_ids=np.concatenate([np.asarray(s) for s in seqs]).astype(np.int64),
            position_ids=np.concatenate([np.arange(len(s)) for s in seqs]).astype(np.int64),
            qo_indptr=base.astype(np.int64),
            kv_page_indices=np.asarray(pool, dtype=np.int64),
            kv_page_indptr=np.array([0, 1, 2, 4], dtype=np.int64),
            kv_last_page_lens=np.array([r.kv_last_page_len for r in requests], dtype=np.int64),
            output_token_indices=np.array([base[r] + i for r, i in wanted], dtype=np.int64),
            samplers=[sampler] * len(wanted))
        out = ex32.step(batch)
        assert len(out.results) == len(wanted)
        for (r, i), result in zip(wanted, out.results):
            assert max_abs_diff(result.logprobs, reference[r][i]) < BATCH_TOL, (r, i)

        # no outputs at all: the step still runs and writes KV, and returns nothing
        no_outputs = ex32.step(StepBatch(**{**batch.__dict__, "output_token_indices": np.zeros(0, np.int64),
                                            "samplers": []}))
        assert no_outputs.results == []
        greedy = ex32.step(StepBatch(**{**batch.__dict__, "samplers": [Sampler()] * len(wanted)}))
        assert [o.token for o in greedy.results] == [int(o.logprobs.argmax()) for o in out.results]
