"""The handler-call service over real gRPC on loopback: inferlet hosts running on a RemoteWorker
behave as on the LocalWorker it stands for; passes from several hosts share steps; a host that
goes away gives its pages back; a worker that goes away fails its inferlets with a clear error
and leaves the host running. All on the session's fp32 executor and real wasmtime.

One LocalWorker (one batcher thread) exists on the executor at a time: each test makes its own.
"""
import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest

from cluster.worker.batcher import BatchPolicy
from cluster.runtime.inferlet_build import build
from cluster.runtime.inferlet_host import InferletHost
from cluster.worker.local_worker import LocalWorker
from cluster.worker.page_registry import PageRefused
from cluster.rpc.remote_worker import RemoteWorker, WorkerUnavailable
from cluster.rpc.worker_service import WorkerServer
from helpers import make_request, wait_until
from workers.errors import InvalidRequestError
from workers.step_types import ForwardRequest, Sampler

ROOT = Path(__file__).resolve().parent.parent
TEXT_COMPLETION = ROOT / "inferlets" / "examples" / "text_completion.py"
ECHO = ROOT / "tests" / "inferlets" / "echo.py"
PROMPT = ["--prompt", "What is the capital of France?", "--max-tokens", "12"]
WAIT_S = 120


@contextlib.contextmanager
def served(executor, policy=BatchPolicy()):
    """A LocalWorker on the executor, served on loopback; yields (worker, server)."""
    worker = LocalWorker(executor, policy)
    server = WorkerServer(worker)
    try:
        yield worker, server
    finally:
        server.stop()
        worker.close()


@pytest.fixture(scope="module")
def programs():
    return {"text": build(TEXT_COMPLETION), "echo": build(ECHO)}


def test_an_inferlet_on_a_remote_worker_says_what_it_says_on_the_local_one(ex32, programs):
    with served(ex32) as (worker, server):
        with InferletHost(worker=worker) as local:
            here = local.run(programs["text"], PROMPT)
        remote_worker = RemoteWorker(server.target)
        assert remote_worker.info == ex32.info
        with InferletHost(worker=remote_worker) as remote:
            there = remote.run(programs["text"], PROMPT)
        remote_worker.close()
        worker.check_idle()
    assert here.ok and there.ok, (here.error, there.error)
    assert "".join(there.messages) == "".join(here.messages) and "Paris" in "".join(here.messages)


def test_passes_from_two_hosts_share_steps(ex32, programs):
    """Three inferlets on each of two hosts, a k=6 policy: the steps hold passes of both hosts."""
    args = PROMPT + ["--ignore-eos"]
    with served(ex32, BatchPolicy("kort", k=6, t_ms=1000)) as (worker, server):
        remotes = [RemoteWorker(server.target) for _ in range(2)]
        hosts = [InferletHost(worker=r) for r in remotes]
        try:
            running = [h.launch(programs["text"], args) for h in hosts for _ in range(3)]
            outcomes = [r.wait(WAIT_S) for r in running]
        finally:
            for h, r in zip(hosts, remotes):
                h.close()
                r.close()
        worker.check_idle()
        steps = list(worker.batcher.steps)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len({"".join(o.messages) for o in outcomes}) == 1  # greedy: all six say the same
    assert max(s.num_passes for s in steps) == 6  # more than one host's three


def test_a_host_that_goes_away_gives_its_pages_back(ex32, programs):
    free_before = ex32.num_free_pages
    with served(ex32) as (worker, server):
        remote = RemoteWorker(server.target)
        host = InferletHost(worker=remote)
        echo = host.launch(programs["echo"], ["8"])
        wait_until(lambda: echo.outcome.messages, 30, "the echo to start")
        assert ex32.num_free_pages == free_before - 8
        remote.close()  # the host's connection drops with its inferlet still holding 8 pages
        wait_until(lambda: ex32.num_free_pages == free_before, 30, "the worker to take the pages back")
        echo.stop()  # it still waits for a message; its host stops it
        echo.wait(WAIT_S)
        host.close()
        worker.check_idle()


def test_a_worker_that_goes_away_fails_its_inferlets_and_the_host_goes_on(ex32, programs):
    free_before = ex32.num_free_pages
    with served(ex32) as (worker, server):
        remote = RemoteWorker(server.target)
        with InferletHost(worker=remote) as host:
            echo = host.launch(programs["echo"], ["2"])
            wait_until(lambda: echo.outcome.messages, 30, "the echo to start")
            server.stop(grace=0)
            wait_until(lambda: _broken(remote), 30, "the host to notice")
            with pytest.raises(WorkerUnavailable, match=server.target):
                remote.allocate("inferlet-x", 1, 8)
            echo.send("quit")
            assert echo.wait(WAIT_S).ok  # it held pages, and ends cleanly: release is best-effort
            launched = host.run(programs["text"], PROMPT)  # a new inferlet fails with the cause
            assert not launched.ok and "worker" in launched.error and server.target in launched.error
        wait_until(lambda: ex32.num_free_pages == free_before, 30, "the pages back")
        worker.check_idle()


def _broken(remote: RemoteWorker) -> bool:
    try:
        remote.list_exports()
    except WorkerUnavailable:
        return True
    return False


def test_the_workers_errors_arrive_as_their_own_classes(ex32):
    with served(ex32) as (worker, server):
        remote = RemoteWorker(server.target)
        try:
            with pytest.raises(PageRefused, match="quota"):
                remote.allocate("inferlet-a", 5, 4)
            pages = remote.allocate("inferlet-a", 1, 4)
            with pytest.raises(PageRefused, match="not held"):
                remote.free("inferlet-b", pages)
            bad = ForwardRequest(token_ids=np.array([1, 2]), position_ids=np.array([0]),
                                 kv_page_indices=np.array(pages), kv_last_page_len=2)
            with pytest.raises(InvalidRequestError):
                remote.forward("inferlet-a", bad).wait(WAIT_S)
            remote.release("inferlet-a")
        finally:
            remote.close()
        worker.check_idle()


def test_held_passes_wait_for_flush_and_keep_their_order(ex32):
    """While a thread holds the connection its passes wait (the scheduler sends a round's passes in
    one frame); a page call from that thread sends them first, so the worker sees calls in order;
    another thread's passes are not held."""
    with served(ex32) as (worker, server):
        remote = RemoteWorker(server.target)
        try:
            [page] = remote.allocate("inferlet-a", 1, 4)
            [other] = remote.allocate("inferlet-b", 1, 4)
            pass_on = lambda p: make_request([1, 2, 3], [p], ex32.info.page_size, outputs=[2],
                                             samplers=[Sampler()])
            remote.hold()
            held = remote.forward("inferlet-a", pass_on(page))
            elsewhere = []
            thread = threading.Thread(target=lambda: elsewhere.append(remote.forward("inferlet-b", pass_on(other))))
            thread.start()
            thread.join()
            elsewhere[0].wait(WAIT_S)  # sent at once from the other thread, answered
            assert not held.done  # still here: the worker never saw it
            remote.flush()
            assert held.wait(WAIT_S)[0].token is not None
            remote.hold()
            second = remote.forward("inferlet-a", pass_on(page))
            remote.free("inferlet-a", [page])  # sends the pass first: freed after the worker pinned it
            assert second.wait(WAIT_S)[0].token is not None  # had the free gone first: PageRefused
            remote.flush()
            remote.release("inferlet-a")
            remote.release("inferlet-b")
        finally:
            remote.close()
        worker.check_idle()


def test_a_local_workers_held_passes_wait_for_flush_to_wake_the_executor(ex32):
    """LocalWorker.hold(): the thread's passes queue without waking the idle executor thread, which
    would otherwise start the step while the round's guests still run (and take the GIL from them);
    flush() wakes it. Another thread's passes wake it at once."""
    worker = LocalWorker(ex32, BatchPolicy())
    try:
        [page] = worker.allocate("inferlet-a", 1, 4)
        [other] = worker.allocate("inferlet-b", 1, 4)
        pass_on = lambda p: make_request([1, 2, 3], [p], ex32.info.page_size, outputs=[2], samplers=[Sampler()])
        worker.hold()
        held = worker.forward("inferlet-a", pass_on(page))
        assert not _done_within(held, 0.5)
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(worker.forward("inferlet-b", pass_on(other))))
        thread.start()
        thread.join()
        assert elsewhere[0].wait(WAIT_S)[0].token is not None  # woke the executor: both went
        assert held.wait(WAIT_S)[0].token is not None
        worker.hold()
        second = worker.forward("inferlet-a", pass_on(page))
        assert not _done_within(second, 0.5)
        worker.flush()
        assert second.wait(WAIT_S)[0].token is not None
        worker.release("inferlet-a")
        worker.release("inferlet-b")
        worker.check_idle()
    finally:
        worker.close()


def _done_within(pending, seconds: float) -> bool:
    try:
        pending.wait(seconds)
        return True
    except TimeoutError:
        return False
