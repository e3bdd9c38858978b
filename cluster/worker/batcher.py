"""Batches the forward passes of every inferlet on one executor into shared steps.

One long-lived thread owns the executor: every tensor operation (steps, slot copies, masks)
runs there, so torch keeps one OpenMP team (a second thread calling torch costs ~40% per
step on these machines) and the executor, which is not thread-safe, has one caller.

Callers get a Pending back at once. Operations (`call`) run in arrival order before the next
step; forward passes queue until the policy dispatches them, all in one executor step:

- adaptive (default): dispatch when the executor is idle; while it is busy, passes
  accumulate and go together in the next step. After a step, an idle executor first gathers
  the passes of the callers it just answered (`gather_ms`): it waits until as many new passes
  have arrived as the step completed, for as long as they keep coming no more than gather_ms
  apart, and never longer than that step took. Without it, the first caller back after a step
  goes alone and the others queue behind it: many callers settle into groups out of phase,
  each getting a step every other step. gather_ms=0 dispatches at once.
- eager: one pass per step, in arrival order (a baseline for measuring batching).
- k: wait until k passes are queued.  t: wait t ms after the first queued pass.
- kort: whichever of k and t comes first.
Each step holds at most `max_batch_tokens` input tokens. Passes that fit whole go first, in
arrival order; the budget left over goes to a chunk of the oldest pass that did not fit (a
long prefill), whose remaining tokens run in the following steps (cluster/worker/prefill_chunks.py).
So a long prompt never stalls the decodes queued behind it, and no step exceeds the budget.
A pass never overtakes an unfinished earlier one whose pages it touches (an inferlet's later
pass may read what its earlier one writes). The Pending of a chunked pass completes with all
of its outputs once its last chunk has run.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cluster import metrics
from cluster.pending import Pending
from cluster.worker.prefill_chunks import chunk, written_pages
from workers.executor import Executor
from workers.step_types import ForwardRequest, pack_batch

log = logging.getLogger("pie.batcher")

POLICIES = ("adaptive", "eager", "k", "t", "kort")


@dataclass(frozen=True)
class BatchPolicy:
    kind: str = "adaptive"
    k: int = 8  # passes to wait for ("k", "kort")
    t_ms: float = 5.0  # how long to wait after the first queued pass ("t", "kort")
    # input tokens per step: on these CPUs a 512-token step takes ~0.45 s (prefill ~1150 tok/s),
    # the most a decode waits behind a long prompt; raise it where steps are cheap (GPUs)
    max_batch_tokens: int = 512
    # "adaptive": after a step, wait for its callers' next passes while they arrive at most this
    # far apart (ms; bounded by the step's own time); 0: dispatch as soon as the executor is idle.
    # On 2 busy CPU cores the inferlets' passes come back ~0.5 ms apart (the scheduler runs one
    # guest at a time), with pauses of a few ms now and then (GC, preemption): a gap of 10 ms
    # means the round is over (or a caller has ended or is doing something else).
    gather_ms: float = 10.0

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"unknown batching policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if self.k < 1 or self.t_ms < 0 or self.max_batch_tokens < 1 or self.gather_ms < 0:
            raise ValueError("batching policy needs k >= 1, t_ms >= 0, max_batch_tokens >= 1 and gather_ms >= 0")


def _count_step(requests, exec_s: float, queued: int) -> None:
    """The step's metrics: its time, its passes, its tokens by phase (one-token passes decode)."""
    decode = sum(len(r.token_ids) == 1 for r in requests)
    metrics.STEP_SECONDS.observe(exec_s)
    metrics.STEP_PASSES.observe(len(requests))
    metrics.TOKENS_DECODE.inc(decode)
    metrics.TOKENS_PREFILL.inc(sum(len(r.token_ids) for r in requests) - decode)
    metrics.QUEUE_PASSES.set(queued)


@dataclass
class StepRecord:
    """What one executor step did (kept for the last few hundred steps, for benchmarks)."""

    num_passes: int  # passes and chunks of passes
    num_tokens: int  # input tokens
    started: float  # time.perf_counter() at dispatch
    exec_s: float  # seconds inside executor.step


@dataclass(eq=False)
class _Queued:
    """A pass waiting for (the rest of) its tokens to run."""

    request: ForwardRequest
    pending: Pending
    queued_at: float  # time.perf_counter()
    seq: int  # arrival number, from 1
    taken: int = 0  # input tokens already handed to a step
    outputs: dict[int, object] = field(default_factory=dict)  # results of earlier chunks, by output index

    @property
    def remaining(self) -> int:
        return len(self.request.token_ids) - self.taken


class Batcher:
    def __init__(self, executor: Executor, policy: BatchPolicy = BatchPolicy(), history: int = 1024):
        self.executor = executor
        self.policy = policy
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=history)
        self._cond = threading.Condition()
        self._ops: collections.deque[tuple[Callable, Pending]] = collections.deque()
        self._passes: collections.deque[_Queued] = collections.deque()  # arrival order
        self._barriers: list[tuple[int, Pending]] = []  # (every pass up to this arrival number, its Pending)
        self._queued_seq = 0  # passes ever queued
        self._closed = False
        # adaptive gathering after a step: passes it completed, new ones since, and when
        self._expect = 0  # 0: not gathering
        self._arrived = 0
        self._gather_end = 0.0  # perf_counter() past which the gathering stops, however many came
        self._last_arrival = 0.0
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._thread.start()

    # -- submitting -----------------------------------------------------------------------------
    def forward(self, request: ForwardRequest, wake: bool = True) -> Pending:
        """Queue a validated pass; the Pending completes with its list of OutputResult.

        wake=False queues it without waking an idle executor thread: the caller has more passes
        coming and calls wake() after the last (an executor that is busy, or that waits with a
        deadline, still takes the pass when it next looks)."""
        pending = Pending()
        with self._cond:
            self._check_open()
            now = time.perf_counter()
            self._queued_seq += 1
            self._passes.append(_Queued(request, pending, now, self._queued_seq))
            if self._expect:
                if self._gather_over(now):
                    self._expect = 0
                else:
                    self._arrived += 1
                    self._last_arrival = now
                    if self._arrived < self._expect and len(self._passes) > 1:
                        # still gathering, and the executor thread already waits with a deadline
                        # (set when the first pass came): no need to wake it for this one
                        return pending
            if wake:
                self._cond.notify()
        return pending

    def wake(self) -> None:
        """Wake the executor thread for passes queued with wake=False."""
        with self._cond:
            self._cond.notify()

    def flush(self) -> Pending:
        """Completes once every operation and pass queued before this call has run."""
        pending = Pending()
        with self._cond:
            self._check_open()  # a stopped thread would never complete it
            self._barriers.append((self._queued_seq, pending))
            self._ops.append((lambda executor: None, Pending()))  # wake the loop even when idle
            self._cond.notify()
        return pending

    def call(self, fn: Callable[[Executor], object]) -> Pending:
        """Run fn(executor) on the executor thread before the next step; completes with its value."""
        pending = Pending()
        with self._cond:
            self._check_open()
            self._ops.append((fn, pending))
            self._cond.notify()
        return pending

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the batcher is closed")

    # -- the executor thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._ready():
                    if self._closed and not self._passes:
                        return
                    self._cond.wait(self._wait_timeout())
                ops = list(self._ops)
                self._ops.clear()
                batch = self._take_batch() if self._ready() else []
            for fn, pending in ops:
                try:
                    pending.complete(fn(self.executor))
                except Exception as e:  # the caller reports it; the thread goes on
                    pending.fail(e)
            if batch:
                self._step(batch)
            with self._cond:
                unfinished = self._passes[0].seq if self._passes else self._queued_seq + 1
                reached = [p for seq, p in self._barriers if seq < unfinished]
                self._barriers = [(seq, p) for seq, p in self._barriers if seq >= unfinished]
            for p in reached:
                p.complete(None)

    def _gather_over(self, now: float) -> bool:
        """The gathering after the last step is over: its callers are back, or late."""
        return (self._arrived >= self._expect or now >= self._gather_end
                or (now - self._last_arrival) * 1e3 >= self.policy.gather_ms)

    def _ready(self) -> bool:
        if not self._passes:
            return False
        if self._closed or self.policy.kind == "eager":
            return True
        if self.policy.kind == "adaptive":
            if self._expect and self._gather_over(time.perf_counter()):
                self._expect = 0
            return not self._expect
        waited_ms = (time.perf_counter() - self._passes[0].queued_at) * 1e3
        enough = len(self._passes) >= self.policy.k
        late = waited_ms >= self.policy.t_ms
        return {"k": enough, "t": late, "kort": enough or late}[self.policy.kind]

    def _wait_timeout(self) -> float | None:
        if self._passes and self._expect:  # adaptive, gathering
            return max(0.0, min(self._gather_end, self._last_arrival + self.policy.gather_ms / 1e3)
                       - time.perf_counter())
        if self._passes and self.policy.kind in ("t", "kort"):
            waited = time.perf_counter() - self._passes[0].queued_at
            return max(0.0, self.policy.t_ms / 1e3 - waited)
        return None

    def _take_batch(self) -> list[tuple[_Queued, int, int]]:
        """(pass, first token, end token) for the next step; fully taken passes leave the queue."""
        budget = self.policy.max_batch_tokens
        eager = self.policy.kind == "eager"
        ps = self.executor.info.page_size
        batch, deferred = [], []
        reads: set[int] = set()  # every page of a pass left (partly) waiting
        writes: set[int] = set()  # the pages its waiting tokens will write

        def free(q: _Queued) -> bool:
            """No earlier waiting pass writes what q touches, or touches what q writes."""
            if not reads:
                return True
            return not ({int(p) for p in q.request.kv_page_indices} & writes
                        or written_pages(q.request, ps, q.taken) & reads)

        def wait(q: _Queued) -> None:
            deferred.append(q)
            reads.update(int(p) for p in q.request.kv_page_indices)
            writes.update(written_pages(q.request, ps, q.taken))

        for q in self._passes:  # whole passes first, in arrival order
            if budget == 0 or (eager and (batch or deferred)):
                break
            if q.remaining <= budget and free(q):
                batch.append((q, q.taken, len(q.request.token_ids)))
                budget -= q.remaining
            else:
                wait(q)
        if budget and deferred and not (eager and batch):  # the budget left: a chunk of the oldest
            waiting, deferred = deferred, []
            reads.clear(), writes.clear()
            for q in waiting:
                if free(q):
                    batch.append((q, q.taken, q.taken + min(budget, q.remaining)))
                    break
                wait(q)
        for q, _, end in batch:
            q.taken = end
        if any(q.remaining == 0 for q, _, _ in batch):
            self._passes = collections.deque(q for q in self._passes if q.remaining)
        batch.sort(key=lambda item: item[0].seq)
        return batch

    def _step(self, batch: list[tuple[_Queued, int, int]]) -> None:
        ps = self.executor.info.page_size
        parts = [(q, None) if end - start == len(q.request.token_ids) else (q, chunk(q.request, start, end, ps))
                 for q, start, end in batch]
        requests = [q.request if c is None else c.request for q, c in parts]
        started = time.perf_counter()
        try:
            results = self.executor.step(pack_batch(requests)).results
        except Exception as e:
            log.exception("executor step over %d passes failed", len(batch))
            failed = {q for q, _ in parts}  # _Queued hashes by identity
            with self._cond:  # the unrun rest of a failed chunked pass goes too
                self._passes = collections.deque(q for q in self._passes if q not in failed)
            for q, _ in parts:
                q.pending.fail(e)
            return
        ended = time.perf_counter()
        exec_s = ended - started
        self.steps.append(StepRecord(len(batch), sum(len(r.token_ids) for r in requests), started, exec_s))
        _count_step(requests, exec_s, len(self._passes))
        if self.policy.kind == "adaptive" and self.policy.gather_ms > 0:
            answered = sum(c is None or q.remaining == 0 for q, c in parts)
            with self._cond:  # before the callers hear back: their next passes are counted
                self._expect, self._arrived = answered, 0
                self._gather_end, self._last_arrival = ended + exec_s, ended
        k = 0
        for (q, c), request in zip(parts, requests):
            n = len(request.samplers)
            mine, k = results[k:k + n], k + n
            if c is None:
                q.pending.complete(mine)
                continue
            q.outputs.update(zip(c.outputs, mine))
            if q.remaining == 0:
                q.pending.complete([q.outputs[i] for i in range(len(q.request.samplers))])

