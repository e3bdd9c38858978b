"""Samplers: through the executor on SmolLM2's real logits, and workers.sampling on synthetic ones.

Seeded draws are deterministic functions of (seed, position, logits), so every assertion over
"many draws" below is about a fixed outcome: it cannot flake from run to run. Allowed sets are
computed from reference log-probs with parameters placed mid-gap, far from any boundary.
"""
import numpy as np
import pytest
import torch

from helpers import allocated, full_logprobs, hf_logprobs, make_request, max_abs_diff, pages_needed, step_logprobs
from workers import Sampler, pack_batch
from workers.sampling import sample_outputs, seeded_generator

SEEDS = range(200)


@pytest.fixture(scope="module")
def probe(_executor_fp32, chat_ids):
    """(tokens, reference log-probs after the last token): the chat prompt cut at its most uncertain
    position, so that sampling there spreads over many tokens."""
    ex = _executor_fp32
    with allocated(ex, pages_needed(len(chat_ids), ex.info.page_size)) as pages:
        logp = step_logprobs(ex, [make_request(chat_ids, pages, ex.info.page_size, outputs=range(len(chat_ids)),
                                               samplers=[full_logprobs(ex.info.vocab_size)] * len(chat_ids))])[0]
    entropy = -(np.exp(logp) * logp).sum(-1)
    pos = int(np.argmax(entropy))
    assert entropy[pos] > 2.0  # nats: a spread-out distribution
    return chat_ids[:pos + 1], logp[pos]


def sample_at(ex, tokens, samplers, prefix_request=None):
    """Results of `samplers`, all at the last token of `tokens` (one prefill step)."""
    ps = ex.info.page_size
    n_extra = 0 if prefix_request is None else pages_needed(len(prefix_request), ps)
    with allocated(ex, pages_needed(len(tokens), ps) + n_extra) as pages:
        req = make_request(tokens, pages[:pages_needed(len(tokens), ps)], ps, outputs=[len(tokens) - 1] * len(samplers),
                           samplers=samplers)
        requests = [req]
        if prefix_request is not None:  # another request first in the same batch
            requests.insert(0, make_request(prefix_request, pages[len(pages) - n_extra:], ps,
                                            outputs=[len(prefix_request) - 1], samplers=[Sampler()]))
        results = ex.step(pack_batch(requests)).results
    return results[len(results) - len(samplers):]


def tokens_of(results) -> list[int]:
    return [r.token for r in results]


def probs_at(logp: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logp.astype(np.float64)) / temperature, -1).numpy()


# --- through the executor ----------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(ex32, probe, chat_ids):
    tokens, _ = probe
    samplers = [Sampler("sample", seed=s) for s in range(64)] + [Sampler("sample", seed=5)]
    first = tokens_of(sample_at(ex32, tokens, samplers))
    assert first == tokens_of(sample_at(ex32, tokens, samplers))  # same step again
    assert first[-1] == first[5]  # same seed, same position, same step
    assert len(set(first)) >= 2  # the seed does change the draw
    # In another batch the logits round slightly differently, and a draw that lands within that
    # rounding of a CDF boundary between two rare tokens may move; the rest must not (measured 63/64).
    # A draw keyed to the row's place in the batch rather than its seed and position would agree ~never.
    other = tokens_of(sample_at(ex32, tokens, samplers, prefix_request=chat_ids[20:33]))
    assert np.mean(np.array(first) == np.array(other)) >= 0.9


def assert_draws_within_top(ex32, tokens, logp, samplers, m: int) -> None:
    """Every draw is one of the m most likely tokens, and the draws are not all the same."""
    drawn = set(tokens_of(sample_at(ex32, tokens, samplers)))
    assert drawn <= set(np.argsort(-logp)[:m].tolist())
    assert len(drawn) >= 2


def test_top_k_samples_stay_in_top_k(ex32, probe):
    tokens, logp = probe
    order = np.argsort(-logp)
    k = next(k for k in range(3, 50) if logp[order[k - 1]] - logp[order[k]] > 1e-3)  # a clear boundary
    assert_draws_within_top(ex32, tokens, logp, [Sampler("sample", temperature=1.5, top_k=k, seed=s) for s in SEEDS], k)


def test_top_p_samples_stay_in_nucleus(ex32, probe):
    tokens, logp = probe
    p = np.sort(probs_at(logp, 1.0))[::-1]
    c = np.cumsum(p)
    m = 4  # top_p halfway between the mass of the top 4 and the top 5: exactly 5 tokens survive
    top_p = float(c[m - 1] + c[m]) / 2
    assert p[m] / 2 > 1e-4  # margin to either boundary
    assert_draws_within_top(ex32, tokens, logp, [Sampler("sample", top_p=top_p, seed=s) for s in SEEDS], m + 1)


def test_min_p_drops_unlikely_tokens(ex32, probe):
    tokens, logp = probe
    p = np.sort(probs_at(logp, 1.0))[::-1]
    ratio = p / p[0]
    m = next(m for m in range(2, 50) if ratio[m] / ratio[m + 1] > 1.05)  # a clear gap after the m+1 best
    min_p = float(np.sqrt(ratio[m] * ratio[m + 1]))
    assert_draws_within_top(ex32, tokens, logp, [Sampler("sample", min_p=min_p, seed=s) for s in SEEDS], m + 1)


def test_allowed_mask_is_respected_by_every_kind(ex32, probe):
    tokens, logp = probe
    vocab = ex32.info.vocab_size
    rng = np.random.default_rng(0)
    candidates = np.setdiff1d(np.arange(vocab), np.argsort(-logp)[:10])  # the 10 most likely are banned
    allowed = np.zeros(vocab, dtype=bool)
    allowed[rng.choice(candidates, 300, replace=False)] = True
    samplers = ([Sampler("greedy", allowed=allowed), Sampler("distribution", top_k=5, temperature=0.8, allowed=allowed),
                 full_logprobs(vocab, allowed=allowed)]
                + [Sampler("sample", temperature=2.0, seed=s, allowed=allowed) for s in SEEDS]
                + [Sampler("sample", top_k=3, seed=s, allowed=allowed) for s in SEEDS])
    greedy, dist, logprobs, *samples = sample_at(ex32, tokens, samplers)
    best_allowed = np.argsort(-logprobs.logprobs)  # the same step's logits, disallowed at -inf
    assert greedy.token == int(np.argmax(np.where(allowed, logprobs.logprobs, -np.inf)))
    assert allowed[greedy.token]
    assert all(allowed[t] for t in tokens_of(samples))
    assert set(tokens_of(samples[len(SEEDS):])) <= set(best_allowed[:3].tolist())
    assert set(dist.ids.tolist()) <= set(np.flatnonzero(allowed).tolist())
    # probabilities renormalize over the allowed tokens
    renormalized = probs_at(np.where(allowed, logp, -np.inf), 0.8)
    np.testing.assert_allclose(dist.probs, renormalized[dist.ids], atol=1e-5)  # tolerance: 1e-5 absolute
    lp = logprobs.logprobs
    assert np.isneginf(lp[~allowed]).all()
    expected = logp[allowed] - np.logaddexp.reduce(logp[allowed].astype(np.float64))
    assert max_abs_diff(lp[allowed], expected) < 1e-4  # tolerance: 1e-4 on log-probs (fp32 rounding)


def test_distribution_is_sorted_top_k_of_softmax(ex32, probe):
    tokens, logp = probe
    (dist,) = sample_at(ex32, tokens, [Sampler("distribution", top_k=10, temperature=0.7)])
    ref = probs_at(logp, 0.7)
    assert dist.ids.dtype == np.int64 and len(dist.ids) == 10 and len(set(dist.ids.tolist())) == 10
    assert (np.diff(dist.probs) <= 0).all()  # most likely first
    np.testing.assert_allclose(dist.probs, ref[dist.ids], atol=1e-5)  # tolerance: 1e-5 absolute
    others = np.delete(ref, dist.ids)
    assert dist.probs.min() >= others.max() - 1e-6  # tolerance: 1e-6, ties at the cut
    assert dist.probs.sum() <= 1 + 1e-5


def test_logprobs_match_transformers(ex32, hf32, probe):
    tokens, logp = probe
    ids = (0, 1, 2, int(np.argmax(logp)), 100, 49151)
    (result,) = sample_at(ex32, tokens, [Sampler("logprobs", token_ids=ids)])
    ref = hf_logprobs(hf32, tokens)[-1]
    assert result.logprobs.shape == (len(ids),)
    assert max_abs_diff(result.logprobs, ref[list(ids)]) < 1e-3  # tolerance: 1e-3 (measured ~1e-4)
    assert max_abs_diff(result.logprobs, logp[list(ids)]) < 1e-5  # same as the full-vocabulary scoring


def test_with_logprob_returns_the_chosen_tokens_model_logprob(ex32, probe):
    """The chosen token's log-probability is the model's own (temperature 1, no filters, no mask),
    whatever the sampler did to choose it; samplers without the flag carry none."""
    tokens, logp = probe
    allowed = np.zeros(ex32.info.vocab_size, bool)
    allowed[np.argsort(logp)[-5:-2]] = True  # neither the most likely token nor a filter boundary
    samplers = [Sampler("greedy", with_logprob=True), Sampler("sample", temperature=0.6, top_k=8, seed=3,
                                                              with_logprob=True),
                Sampler("greedy", allowed=allowed, with_logprob=True), Sampler("sample", seed=3)]
    results = sample_at(ex32, tokens, samplers)
    assert results[0].token == int(np.argmax(logp))
    assert allowed[results[2].token]
    for r in results[:3]:
        # tolerance: 1e-4 (measured 2.5e-5: the reference comes from a step of another shape)
        assert abs(r.logprob - logp[r.token]) < 1e-4
    assert results[3].logprob is None


# --- workers.sampling.sample_outputs on synthetic logits ---------------------------------------

PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])


def draws(probs, n: int = 400, position: int = 0, **sampler) -> list[int]:
    """n seeded "sample" draws (seeds 0..n-1) from logits log(probs), all at one position."""
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(n, -1).clone()
    samplers = [Sampler("sample", seed=s, **sampler) for s in range(n)]
    return [r.token for r in sample_outputs(logits, samplers, [position] * n, torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("sampler, support", [
    ({}, {0, 1, 2, 3, 4}),
    ({"top_k": 2}, {0, 1}),
    ({"top_k": 5}, {0, 1, 2, 3, 4}),
    ({"top_p": 0.6}, {0, 1}),  # mass before token 1 is 0.4 < 0.6; before token 2, 0.7
    ({"top_p": 0.05}, {0}),  # the most likely token always stays
    ({"min_p": 0.3}, {0, 1, 2}),  # p >= 0.3 * 0.4 = 0.12
    ({"top_p": 0.9, "min_p": 0.3}, {0, 1, 2}),  # top-p keeps 0..3, min-p drops 3
    ({"top_k": 3, "top_p": 0.45}, {0}),  # renormalized over the top 3, token 1 starts at 0.47 >= 0.45
    ({"top_k": 4, "min_p": 0.3}, {0, 1, 2}),
])
def test_filters_give_exactly_the_allowed_support(sampler, support):
    # 400 draws: every token in the support has p >= 0.05 after filtering, so each shows up
    assert set(draws(PROBS, **sampler)) == support


@pytest.mark.parametrize("sampler, expected", [
    ({}, PROBS),
    ({"temperature": 2.0}, np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
    ({"top_k": 2}, np.array([4, 3, 0, 0, 0]) / 7),
    ({"top_p": 0.6}, np.array([4, 3, 0, 0, 0]) / 7),
])
def test_seeded_draws_follow_the_filtered_distribution(sampler, expected):
    freq = np.bincount(draws(PROBS, n=3000, **sampler), minlength=5) / 3000
    # tolerance: 0.04 absolute per token, over 4 standard deviations of a 3000-draw frequency
    np.testing.assert_allclose(freq, expected, atol=0.04)


def test_top_k_beyond_the_vocabulary_keeps_everything():
    """top_k larger than the vocabulary passes validation (only distribution caps it), so sampling
    must treat it as "keep all" rather than fail after the forward pass."""
    assert set(draws(PROBS, top_k=6)) == {0, 1, 2, 3, 4}


def test_seed_and_position_determine_the_draw():
    uniform = [1.0] * 1000
    assert draws(uniform, n=50, position=17) == draws(uniform, n=50, position=17)
    one = lambda seed, pos, gen: sample_outputs(torch.zeros(1, 1000), [Sampler("sample", seed=seed)], [pos], gen)[0].token
    assert one(3, 17, torch.Generator().manual_seed(0)) == one(3, 17, torch.Generator().manual_seed(99))
    assert len({one(3, pos, torch.Generator()) for pos in range(100)}) > 80  # a fresh draw per position
    assert len(set(draws(uniform, n=100, position=17))) > 80  # and per seed
    g = torch.Generator().manual_seed(0)
    unseeded = [sample_outputs(torch.zeros(1, 1000), [Sampler("sample")], [17], g)[0].token for _ in range(20)]
    assert len(set(unseeded)) > 10  # without a seed the shared generator advances
    a, b = seeded_generator(5, 9, torch.device("cpu")), seeded_generator(5, 9, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_allowed_mask_on_synthetic_logits():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 5)
    allowed = np.array([False, False, True, True, False])
    samplers = [Sampler("greedy", allowed=allowed), Sampler("distribution", top_k=2, allowed=allowed),
                Sampler("logprobs", token_ids=(0, 2, 3), allowed=allowed), Sampler("greedy"),
                Sampler("sample", seed=1, top_p=0.5, allowed=allowed)]
    greedy, dist, logprobs, unrestricted, sample = sample_outputs(logits, samplers, [0] * 5, torch.Generator())
    assert greedy.token == 2 and unrestricted.token == 0
    assert sample.token == 2  # renormalized over {2, 3}: token 2 has 0.73 >= top_p alone
    assert dist.ids.tolist() == [2, 3]
    e = np.exp(1.0)
    np.testing.assert_allclose(dist.probs, [e / (e + 1), 1 / (e + 1)], atol=1e-6)  # tolerance: 1e-6 (fp32)
    assert np.isneginf(logprobs.logprobs[0])
    np.testing.assert_allclose(logprobs.logprobs[1:], np.log([e / (e + 1), 1 / (e + 1)]), atol=1e-6)
