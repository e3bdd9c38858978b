"""Batches the forward passes of every inferlet on one executor into shared steps.

One long-lived thread owns the executor: every tensor operation (steps, slot copies, masks)
runs there, so torch keeps one OpenMP team (a second thread calling torch costs ~40% per
step on these machines) and the executor, which is not thread-safe, has one caller.

Callers get a Pending back at once. Operations (`call`) run in arrival order before the next
step; forward passes queue until the policy dispatches them, all in one executor step:

- adaptive (default): dispatch as soon as the executor is idle; while it is busy, passes
  accumulate and go together in the next step.
- eager: one pass per step, in arrival order (a baseline for measuring batching).
- k: wait until k passes are queued.  t: wait t ms after the first queued pass.
- kort: whichever of k and t comes first.
A step takes passes in arrival order up to `max_batch_tokens` input tokens (at least one).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from cluster.pending import Pending
from workers.executor import Executor
from workers.step_types import ForwardRequest, pack_batch

log = logging.getLogger("pie.batcher")

POLICIES = ("adaptive", "eager", "k", "t", "kort")


@dataclass(frozen=True)
class BatchPolicy:
    kind: str = "adaptive"
    k: int = 8  # passes to wait for ("k", "kort")
    t_ms: float = 5.0  # how long to wait after the first queued pass ("t", "kort")
    max_batch_tokens: int = 4096  # input tokens per step

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"unknown batching policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if self.k < 1 or self.t_ms < 0 or self.max_batch_tokens < 1:
            raise ValueError("batching policy needs k >= 1, t_ms >= 0 and max_batch_tokens >= 1")


@dataclass
class StepRecord:
    """What one executor step did (kept for the last few hundred steps, for benchmarks)."""

    num_passes: int
    num_tokens: int  # input tokens
    started: float  # time.perf_counter() at dispatch
    exec_s: float  # seconds inside executor.step


class Batcher:
    def __init__(self, executor: Executor, policy: BatchPolicy = BatchPolicy(), history: int = 1024):
        self.executor = executor
        self.policy = policy
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=history)
        self._cond = threading.Condition()
        self._ops: collections.deque[tuple[Callable, Pending]] = collections.deque()
        self._passes: collections.deque[tuple[ForwardRequest, Pending, float]] = collections.deque()
        self._barriers: list[tuple[int, Pending]] = []  # (pass sequence number to reach, its Pending)
        self._queued_seq = 0  # passes ever queued
        self._done_seq = 0  # passes ever finished (they finish in queue order)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._thread.start()

    # -- submitting -----------------------------------------------------------------------------
    def forward(self, request: ForwardRequest) -> Pending:
        """Queue a validated pass; the Pending completes with its list of OutputResult."""
        pending = Pending()
        with self._cond:
            self._check_open()
            self._passes.append((request, pending, time.perf_counter()))
            self._queued_seq += 1
            self._cond.notify()
        return pending

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
                self._done_seq += len(batch)
                reached = [p for seq, p in self._barriers if seq <= self._done_seq]
                self._barriers = [(seq, p) for seq, p in self._barriers if seq > self._done_seq]
            for p in reached:
                p.complete(None)

    def _ready(self) -> bool:
        if not self._passes:
            return False
        if self._closed or self.policy.kind in ("adaptive", "eager"):
            return True
        waited_ms = (time.perf_counter() - self._passes[0][2]) * 1e3
        enough = len(self._passes) >= self.policy.k
        late = waited_ms >= self.policy.t_ms
        return {"k": enough, "t": late, "kort": enough or late}[self.policy.kind]

    def _wait_timeout(self) -> float | None:
        if self._passes and self.policy.kind in ("t", "kort"):
            waited = time.perf_counter() - self._passes[0][2]
            return max(0.0, self.policy.t_ms / 1e3 - waited)
        return None

    def _take_batch(self) -> list[tuple[ForwardRequest, Pending, float]]:
        limit = 1 if self.policy.kind == "eager" else len(self._passes)
        batch, tokens = [], 0
        while self._passes and len(batch) < limit:
            n = len(self._passes[0][0].token_ids)
            if batch and tokens + n > self.policy.max_batch_tokens:
                break
            batch.append(self._passes.popleft())
            tokens += n
        return batch

    def _step(self, batch) -> None:
        requests = [request for request, _, _ in batch]
        started = time.perf_counter()
        try:
            results = self.executor.step(pack_batch(requests)).results
        except Exception as e:
            log.exception("executor step over %d passes failed", len(batch))
            for _, pending, _ in batch:
                pending.fail(e)
            return
        exec_s = time.perf_counter() - started
        self.steps.append(StepRecord(len(batch), sum(len(r.token_ids) for r in requests), started, exec_s))
        k = 0
        for request, pending, _ in batch:
            n = len(request.samplers)
            pending.complete(results[k:k + n])
            k += n
