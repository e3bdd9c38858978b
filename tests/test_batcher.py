"""Batcher on the real executor: passes from many threads share steps and each gets exactly its
own outputs; the policies decide when a step goes; operations, flushes, failures and close keep
their order.

Most tests first park the executor thread in an operation (`hold`) so that every pass they queue
is waiting when it is let go: what goes into which step is then fixed, not a race.
"""
import logging
import threading
import time

import numpy as np
import pytest

from cluster.worker.batcher import Batcher, BatchPolicy
from helpers import allocated, full_logprobs, make_request, max_abs_diff, pages_needed, step_logprobs
from workers import Sampler, pack_batch

BATCH_TOL = 5e-4  # batched vs alone, fp32 log-probs (as in test_batching.py)
WAIT_S = 60  # generous: a step of SmolLM2 on two busy cores takes well under a second


class Hold:
    """An operation that keeps the executor thread busy until released."""

    def __init__(self, batcher):
        self._go = threading.Event()
        self._entered = threading.Event()
        self.pending = batcher.call(self._run)
        assert self._entered.wait(WAIT_S), "the executor thread never ran the hold"

    def _run(self, executor):
        self._entered.set()
        self._go.wait(WAIT_S)

    def release(self):
        self._go.set()
        self.pending.wait(WAIT_S)


class Batchers:
    """Makes batchers and holds for one test; afterwards releases every hold and closes every
    batcher, so a failing test does not leave an executor thread parked."""

    def __init__(self):
        self._batchers: list[Batcher] = []
        self._holds: list[Hold] = []

    def __call__(self, executor, policy=BatchPolicy()) -> Batcher:
        batcher = Batcher(executor, policy)
        self._batchers.append(batcher)
        return batcher

    def hold(self, batcher) -> Hold:
        hold = Hold(batcher)
        self._holds.append(hold)
        return hold

    def close(self) -> None:
        for hold in self._holds:
            hold.release()
        for batcher in self._batchers:
            batcher.close(WAIT_S)


@pytest.fixture
def make_batcher():
    made = Batchers()
    yield made
    made.close()


def greedy_pass(executor, tokens, pages):
    """A prefill of `tokens` into `pages` with one greedy output at its last token."""
    return make_request(tokens, pages, executor.info.page_size, outputs=[len(tokens) - 1], samplers=[Sampler()])


def split(pool, sizes, page_size):
    """Consecutive page lists of `pool` holding sequences of the given lengths."""
    out, k = [], 0
    for n in sizes:
        out.append(pool[k:k + pages_needed(n, page_size)])
        k += pages_needed(n, page_size)
    return out


def test_passes_from_threads_share_a_step_and_each_gets_its_own_outputs(ex32, chat_ids, make_batcher):
    ps, vocab = ex32.info.page_size, ex32.info.vocab_size
    seqs = [chat_ids[:9], chat_ids[5:30], chat_ids[20:37], chat_ids[1:4], chat_ids[12:28]]
    outputs = [[8], [0, 12, 24], [], [0, 1, 2], [15, 3]]  # pass 2 asks for nothing
    with allocated(ex32, sum(pages_needed(len(s), ps) for s in seqs)) as pool:
        pages = split(pool, [len(s) for s in seqs], ps)
        requests = [make_request(s, p, ps, outputs=o, samplers=[full_logprobs(vocab)] * len(o))
                    for s, p, o in zip(seqs, pages, outputs)]
        alone = [step_logprobs(ex32, [r])[0] for r in requests]

        batcher = make_batcher(ex32)
        hold = make_batcher.hold(batcher)
        pendings = [None] * len(requests)
        start = threading.Barrier(len(requests))

        def submit(i):
            start.wait(WAIT_S)
            pendings[i] = batcher.forward(requests[i])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        hold.release()
        results = [p.wait(WAIT_S) for p in pendings]
        batcher.close(WAIT_S)

    assert [(s.num_passes, s.num_tokens) for s in batcher.steps] == [(5, sum(len(s) for s in seqs))]
    for i, (got, want) in enumerate(zip(results, alone)):
        assert len(got) == len(outputs[i]), f"pass {i}"
        if outputs[i]:
            assert max_abs_diff(np.stack([r.logprobs for r in got]), want) < BATCH_TOL, f"pass {i}"


def test_adaptive_batches_what_queued_while_busy(ex32, chat_ids, make_batcher):
    """An idle executor takes a lone pass at once; passes queued while it is busy (here: held in
    an operation) go together in its next step."""
    with allocated(ex32, 5) as pool:
        batcher = make_batcher(ex32)
        batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[:1])).wait(WAIT_S)
        hold = make_batcher.hold(batcher)
        rest = [batcher.forward(greedy_pass(ex32, chat_ids[k:k + 10], pool[1 + k:2 + k])) for k in range(4)]
        hold.release()
        for p in rest:
            p.wait(WAIT_S)
    assert [s.num_passes for s in batcher.steps] == [1, 4]


def test_adaptive_gathers_the_passes_of_the_callers_it_just_answered(ex32, chat_ids, make_batcher):
    """Three callers share a step; their next passes come back a little apart (as inferlets
    resubmitting one after another on the scheduler thread do): they go together, not the first
    alone and the others behind it. With gather_ms=0 the first would go at once, alone."""
    with allocated(ex32, 6) as pool:
        batcher = make_batcher(ex32, BatchPolicy(gather_ms=200))
        hold = make_batcher.hold(batcher)
        first = [batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[i:i + 1])) for i in range(3)]
        hold.release()
        for p in first:
            p.wait(WAIT_S)
        second = []
        for i in range(3):
            time.sleep(0.01)  # 10 ms apart, inside the 200 ms gap (the step itself takes longer)
            second.append(batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[3 + i:4 + i])))
        for p in second:
            p.wait(WAIT_S)
    assert [s.num_passes for s in batcher.steps] == [3, 3]


def test_adaptive_does_not_wait_past_the_gap_for_a_caller_that_does_not_come_back(ex32, chat_ids, make_batcher):
    """Two callers share a step, only one sends another pass: it waits for the other at most
    gather_ms (nor longer than the step took), then goes alone; the next lone pass, after the
    gathering is over, goes at once."""
    with allocated(ex32, 4) as pool:
        batcher = make_batcher(ex32, BatchPolicy(gather_ms=150))
        hold = make_batcher.hold(batcher)
        first = [batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[i:i + 1])) for i in range(2)]
        hold.release()
        for p in first:
            p.wait(WAIT_S)
        queued = time.perf_counter()
        batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[2:3])).wait(WAIT_S)
        pair, alone = batcher.steps[0], batcher.steps[1]
        waited = alone.started - queued
        assert min(0.15, pair.exec_s) * 0.9 <= waited < 5, waited  # it waited, but not for ever
        time.sleep(0.2)  # past the gathering after that step
        queued = time.perf_counter()
        batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[3:4])).wait(WAIT_S)
    assert [s.num_passes for s in batcher.steps] == [2, 1, 1]
    assert batcher.steps[2].started - queued < 0.1  # nothing to gather: at once


def test_eager_policy_runs_one_pass_per_step(ex32, chat_ids, make_batcher):
    ps = ex32.info.page_size
    sizes = [3, 20, 7, 1]
    with allocated(ex32, sum(pages_needed(n, ps) for n in sizes)) as pool:
        batcher = make_batcher(ex32, BatchPolicy("eager"))
        hold = make_batcher.hold(batcher)
        requests = [greedy_pass(ex32, chat_ids[:n], p) for n, p in zip(sizes, split(pool, sizes, ps))]
        pendings = [batcher.forward(r) for r in requests]
        hold.release()
        tokens = [p.wait(WAIT_S)[0].token for p in pendings]
        assert [(s.num_passes, s.num_tokens) for s in batcher.steps] == [(1, n) for n in sizes]  # in arrival order
        assert tokens == [ex32.step(pack_batch([r])).results[0].token for r in requests]


def test_k_policy_waits_for_k_passes(ex32, chat_ids, make_batcher):
    with allocated(ex32, 3) as pool:
        batcher = make_batcher(ex32, BatchPolicy("k", k=3))
        first = [batcher.forward(greedy_pass(ex32, chat_ids[:4], pool[i:i + 1])) for i in range(2)]
        with pytest.raises(TimeoutError):
            first[0].wait(0.3)  # two of three: nothing goes, however long
        assert not first[1].done and len(batcher.steps) == 0
        third = batcher.forward(greedy_pass(ex32, chat_ids[:4], pool[2:3]))
        for p in first + [third]:
            p.wait(WAIT_S)
        assert [s.num_passes for s in batcher.steps] == [3]


def test_t_policy_dispatches_after_t_ms(ex32, chat_ids, make_batcher):
    with allocated(ex32, 2) as pool:
        batcher = make_batcher(ex32, BatchPolicy("t", t_ms=300))
        requests = [greedy_pass(ex32, chat_ids[:4], pool[i:i + 1]) for i in range(2)]
        queued = time.perf_counter()
        pendings = [batcher.forward(r) for r in requests]
        for p in pendings:
            p.wait(WAIT_S)
        (step,) = batcher.steps
        assert step.num_passes == 2  # the second came within the first's 300 ms
        assert 0.3 <= step.started - queued < 10


def test_kort_policy_goes_at_k_or_after_t_whichever_first(ex32, chat_ids, make_batcher):
    with allocated(ex32, 2) as pool:
        requests = [greedy_pass(ex32, chat_ids[:4], pool[i:i + 1]) for i in range(2)]
        # t first: 2 of 100 passes, dispatched by the 200 ms fallback
        batcher = make_batcher(ex32, BatchPolicy("kort", k=100, t_ms=200))
        queued = time.perf_counter()
        pendings = [batcher.forward(r) for r in requests]
        for p in pendings:
            p.wait(WAIT_S)
        (step,) = batcher.steps
        assert step.num_passes == 2 and 0.2 <= step.started - queued < 10
        batcher.close(WAIT_S)

        # k first: 2 of 2 passes go long before the 100 s fallback
        batcher = make_batcher(ex32, BatchPolicy("kort", k=2, t_ms=100_000))
        queued = time.perf_counter()
        pendings = [batcher.forward(r) for r in requests]
        for p in pendings:
            p.wait(WAIT_S)
        (step,) = batcher.steps
        assert step.num_passes == 2 and step.started - queued < 10


def test_max_batch_tokens_bounds_every_step_and_chunks_what_does_not_fit(ex32, chat_ids, make_batcher):
    ps = ex32.info.page_size
    sizes = [6, 6, 3, 12, 1]
    with allocated(ex32, sum(pages_needed(n, ps) for n in sizes)) as pool:
        batcher = make_batcher(ex32, BatchPolicy(max_batch_tokens=10))
        hold = make_batcher.hold(batcher)
        requests = [greedy_pass(ex32, chat_ids[:n], p) for n, p in zip(sizes, split(pool, sizes, ps))]
        pendings = [batcher.forward(r) for r in requests]
        hold.release()
        tokens = [p.wait(WAIT_S)[0].token for p in pendings]
        assert tokens == [ex32.step(pack_batch([r])).results[0].token for r in requests]
    # step 1: the passes that fit whole, in arrival order (6, 3, 1); step 2: the other 6 and the
    # first 4 tokens of the 12; step 3: its last 8
    assert [(s.num_passes, s.num_tokens) for s in batcher.steps] == [(3, 10), (2, 10), (1, 8)]


def test_a_chunked_prefill_gives_the_outputs_of_the_whole_pass(ex32, chat_ids, make_batcher):
    """History of 5 slots, then a 32-token pass with outputs in every chunk and a custom mask,
    under a 12-token budget: three chunks whose outputs equal the whole pass's, in its order."""
    ps, vocab = ex32.info.page_size, ex32.info.vocab_size
    history, tokens = chat_ids[:5], chat_ids[5:37]
    kv = len(history) + len(tokens)
    mask = np.tril(np.ones((len(tokens), kv), dtype=bool), k=len(history))
    mask[:, 3] = False  # nobody attends to slot 3: a mask the chunks must keep
    outputs = [31, 0, 11, 12, 20, 5]  # out of order, on both sides of the chunk borders
    with allocated(ex32, pages_needed(kv, ps)) as pages:
        ex32.step(pack_batch([make_request(history, pages[:pages_needed(len(history), ps)], ps)]))
        request = make_request(tokens, pages, ps, start=len(history), outputs=outputs,
                               samplers=[full_logprobs(vocab)] * len(outputs), mask=mask)
        whole = step_logprobs(ex32, [request])[0]
        batcher = make_batcher(ex32, BatchPolicy(max_batch_tokens=12))
        got = batcher.forward(request).wait(WAIT_S)
    assert [(s.num_passes, s.num_tokens) for s in batcher.steps] == [(1, 12), (1, 12), (1, 8)]
    assert max_abs_diff(np.stack([r.logprobs for r in got]), whole) < BATCH_TOL


def test_decodes_keep_flowing_beside_a_long_prefill(ex32, chat_ids, make_batcher):
    """A 36-token prefill queued before three decodes, budget 16: the decodes go in the first step
    with a 13-token chunk of the prefill, and finish before it does."""
    ps = ex32.info.page_size
    with allocated(ex32, pages_needed(36, ps) + 3) as pool:
        prompts = [pool[pages_needed(36, ps) + i:pages_needed(36, ps) + i + 1] for i in range(3)]
        for i, p in enumerate(prompts):  # each decode continues a 5-token history
            ex32.step(pack_batch([make_request(chat_ids[i:i + 5], p, ps)]))
        batcher = make_batcher(ex32, BatchPolicy(max_batch_tokens=16))
        hold = make_batcher.hold(batcher)
        prefill = batcher.forward(greedy_pass(ex32, chat_ids[:36], pool[:pages_needed(36, ps)]))
        decodes = [batcher.forward(make_request([chat_ids[20 + i]], p, ps, start=5, outputs=[0],
                                                samplers=[Sampler()])) for i, p in enumerate(prompts)]
        hold.release()
        decodes[-1].wait(WAIT_S)
        assert len(batcher.steps) == 1 and not prefill.done
        prefill.wait(WAIT_S)
    assert [(s.num_passes, s.num_tokens) for s in batcher.steps] == [(4, 16), (1, 16), (1, 7)]


def test_a_pass_never_overtakes_an_earlier_one_on_its_pages(ex32, chat_ids, make_batcher):
    """An inferlet's prefill (chunked) and then its next decode on the same pages, plus another
    inferlet's decode: the first inferlet's decode waits for its whole prefill; the other does not."""
    ps = ex32.info.page_size
    n = 30
    with allocated(ex32, pages_needed(n + 1, ps) + 1) as pool:
        own, other = pool[:pages_needed(n + 1, ps)], pool[-1:]
        ex32.step(pack_batch([make_request(chat_ids[:5], other, ps)]))
        prefill = greedy_pass(ex32, chat_ids[:n], own[:pages_needed(n, ps)])
        follow = make_request([chat_ids[n]], own, ps, start=n, outputs=[0], samplers=[Sampler()])
        batcher = make_batcher(ex32, BatchPolicy(max_batch_tokens=8))
        hold = make_batcher.hold(batcher)
        pendings = [batcher.forward(prefill), batcher.forward(follow),
                    batcher.forward(make_request([chat_ids[5]], other, ps, start=5, outputs=[0],
                                                 samplers=[Sampler()]))]
        hold.release()
        got = [p.wait(WAIT_S)[0].token for p in pendings]
        steps = [(s.num_passes, s.num_tokens) for s in batcher.steps]
        # the other decode rides in step 1; the follow-up waits for the step with the prefill's last
        # chunk (within a step the executor writes every pass's KV before any pass attends)
        assert steps == [(2, 8), (1, 8), (1, 8), (2, 8)]
        # the same tokens as the passes one after another, unbatched
        with allocated(ex32, pages_needed(n + 1, ps)) as fresh:
            want = [ex32.step(pack_batch([greedy_pass(ex32, chat_ids[:n], fresh[:pages_needed(n, ps)])])).results[0].token,
                    ex32.step(pack_batch([make_request([chat_ids[n]], fresh, ps, start=n, outputs=[0],
                                                       samplers=[Sampler()])])).results[0].token]
        assert got[:2] == want


def test_call_runs_on_the_executor_thread_before_later_passes(ex32, chat_ids, make_batcher):
    with allocated(ex32, 1) as pool:
        batcher = make_batcher(ex32)
        seen = {}

        def op(executor):
            seen.update(thread=threading.current_thread().name, executor=executor, steps=len(batcher.steps),
                        at=time.perf_counter())
            return "op-result"

        hold = make_batcher.hold(batcher)
        done = batcher.call(op)
        passed = batcher.forward(greedy_pass(ex32, chat_ids[:4], pool))
        hold.release()
        assert done.wait(WAIT_S) == "op-result"
        passed.wait(WAIT_S)
    assert seen["thread"] == "executor" and seen["executor"] is ex32
    assert seen["steps"] == 0 and seen["at"] < batcher.steps[0].started


def test_call_changes_what_a_later_pass_sees(ex32, chat_ids, make_batcher):
    """A mask queued through call() is in place for the pass queued right after it."""
    ps, vocab = ex32.info.page_size, ex32.info.vocab_size
    history = chat_ids[:12]
    masked = [i in (2, 3, 7) for i in range(ps)]
    with allocated(ex32, 1) as pages:
        def decode():
            return make_request([chat_ids[12]], pages, ps, start=len(history), outputs=[0],
                                samplers=[full_logprobs(vocab)])

        step_logprobs(ex32, [make_request(history, pages, ps)])
        unmasked = step_logprobs(ex32, [decode()])[0]
        ex32.mask_slots(pages[0], masked)
        want = step_logprobs(ex32, [decode()])[0]
        ex32.mask_slots(pages[0], [False] * ps)
        assert max_abs_diff(unmasked, want) > 1e-3  # the mask matters

        batcher = make_batcher(ex32)
        hold = make_batcher.hold(batcher)
        batcher.call(lambda executor: executor.mask_slots(pages[0], masked))
        got = batcher.forward(decode())
        hold.release()
        rows = np.stack([r.logprobs for r in got.wait(WAIT_S)])
        batcher.call(lambda executor: executor.mask_slots(pages[0], [False] * ps)).wait(WAIT_S)
    assert max_abs_diff(rows, want) < BATCH_TOL


def test_a_failing_call_fails_only_its_own_pending(ex32, make_batcher):
    batcher = make_batcher(ex32)
    bad = batcher.call(lambda executor: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.wait(WAIT_S)
    assert batcher.call(lambda executor: executor.num_free_pages).wait(WAIT_S) == ex32.num_free_pages


class FailsOnce:
    """The real executor, except that its next step raises."""

    def __init__(self, inner):
        self.inner = inner
        self.failures = 1

    def step(self, batch):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected step failure")
        return self.inner.step(batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failed_step_fails_its_whole_batch_and_the_thread_goes_on(ex32, chat_ids, make_batcher, caplog):
    with allocated(ex32, 3) as pool:
        batcher = make_batcher(FailsOnce(ex32))
        hold = make_batcher.hold(batcher)
        doomed = [batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[i:i + 1])) for i in range(2)]
        with caplog.at_level(logging.ERROR, logger="pie.batcher"):
            hold.release()
            for p in doomed:
                with pytest.raises(RuntimeError, match="injected"):
                    p.wait(WAIT_S)
        assert doomed[0].error is doomed[1].error
        assert "executor step over 2 passes failed" in caplog.text
        assert len(batcher.steps) == 0  # a failed step is not recorded

        later = batcher.forward(greedy_pass(ex32, chat_ids[:5], pool[2:3]))
        (result,) = later.wait(WAIT_S)
        alone = ex32.step(pack_batch([greedy_pass(ex32, chat_ids[:5], pool[:1])])).results[0]
        assert result.token == alone.token
        batcher.flush().wait(WAIT_S)
    assert [s.num_passes for s in batcher.steps] == [1]


def test_flush_completes_after_what_was_queued_before_it(ex32, chat_ids, make_batcher):
    with allocated(ex32, 3) as pool:
        batcher = make_batcher(ex32)
        assert batcher.flush().wait(WAIT_S) is None  # nothing queued: done at once
        hold = make_batcher.hold(batcher)
        before = [batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[i:i + 1])) for i in range(2)]
        op = batcher.call(lambda executor: "op")
        flushed = batcher.flush()
        with pytest.raises(TimeoutError):
            flushed.wait(0.2)  # the executor thread is parked: nothing ran yet
        hold.release()
        flushed.wait(WAIT_S)
        assert all(p.done for p in before) and op.done
        after = batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[2:3]))
        batcher.flush().wait(WAIT_S)
        assert after.done


def test_flush_waits_for_passes_the_policy_holds_back(ex32, chat_ids, make_batcher):
    with allocated(ex32, 2) as pool:
        batcher = make_batcher(ex32, BatchPolicy("k", k=2))
        first = batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[:1]))
        flushed = batcher.flush()
        with pytest.raises(TimeoutError):
            flushed.wait(0.2)
        second = batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[1:2]))
        flushed.wait(WAIT_S)
        assert first.done
        second.wait(WAIT_S)


@pytest.mark.parametrize("policy", [
    dict(kind="fifo"), dict(kind=""), dict(k=0), dict(t_ms=-1.0), dict(max_batch_tokens=0), dict(gather_ms=-1.0),
])
def test_bad_policy_raises_value_error(policy):
    with pytest.raises(ValueError):
        BatchPolicy(**policy)


def test_close_finishes_queued_work_then_refuses_more(ex32, chat_ids, make_batcher):
    with allocated(ex32, 2) as pool:
        # a k policy that would never dispatch two passes on its own: close sends them
        batcher = make_batcher(ex32, BatchPolicy("k", k=10))
        pendings = [batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[i:i + 1])) for i in range(2)]
        op = batcher.call(lambda executor: "ran")
        batcher.close(WAIT_S)
        assert all(p.done and p.error is None for p in pendings)
        assert op.done and op.value == "ran"
        assert [s.num_passes for s in batcher.steps] == [2]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.forward(greedy_pass(ex32, chat_ids[:6], pool[:1]))
    with pytest.raises(RuntimeError, match="closed"):
        batcher.call(lambda executor: None)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.flush()  # (it used to return a Pending that never completed)
    batcher.close(WAIT_S)  # a second close is harmless
