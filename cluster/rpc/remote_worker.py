"""The host side of the handler-call service: a worker in another process, with LocalWorker's methods.

An InferletHost given a RemoteWorker runs its inferlets exactly as on a LocalWorker: the
same imports call the same methods, which travel as msgpack Calls over one gRPC stream
(cluster/rpc/worker_service.py). Page calls wait for their reply (a loopback round trip, well
under a millisecond); a forward pass returns a Pending at once. While a thread holds the
connection (`hold()`, the scheduler during a round of polls), its forward passes wait and go
out together at `flush()`: one gRPC message for a round's passes instead of one each, with one
wake-up of the sending thread, where the worker's batcher waits for them all anyway. If the
connection drops, every outstanding and later call fails with WorkerUnavailable, naming the worker.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from cluster.rpc.call_stream import CallClient
from cluster.errors import InferletError
from cluster.pending import Pending
from cluster.proto import worker_pb2_grpc
from workers.executor import ModelInfo
from workers.step_types import ForwardRequest
from workers.tokenizer import Tokenizer, TokenizerSpec

MAX_HOLD_S = 0.010  # a held pass goes out with the next one held after this long, not only at flush()


class WorkerUnavailable(InferletError):
    """The worker this inferlet runs on cannot be reached (it died or was stopped)."""


class RemoteWorker:
    def __init__(self, target: str, timeout_s: float = 60.0, on_broken: Callable[[str], None] | None = None,
                 token: str | None = None, name: str = ""):
        """Connects to the worker at `target` and asks it for its model. `on_broken(reason)` runs
        once, on the reader thread, when the connection is lost. `token`: the worker's, if it has one.
        `name`: its id in the cluster, which errors name beside the address."""
        self.target = target
        self._holder: int | None = None  # the thread whose passes wait for flush()
        self._held: list[bytes] = []
        self._held_since = 0.0  # perf_counter() of the oldest held pass
        self._conn = CallClient(target, lambda channel: worker_pb2_grpc.WorkerStub(channel).Calls, WorkerUnavailable,
                                f"the worker {name} at {target}" if name else f"the worker at {target}", timeout_s,
                                on_broken, token)
        described = self.wait(self._call("describe", ""))
        info = dict(described["info"])
        info["stop_token_ids"] = tuple(info["stop_token_ids"])
        self.info = ModelInfo(**info)
        self.tokenizer = Tokenizer(TokenizerSpec.from_json(described["tokenizer_meta"], described["tokenizer_json"]))

    # -- the handlers (LocalWorker's methods) ----------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return self._sync("num_free_pages", "")

    def allocate(self, holder: str, count: int, quota: int) -> list[int]:
        return list(self._sync("allocate", holder, count, quota))

    def free(self, holder: str, pages: list[int]) -> None:
        self._sync("free", holder, list(pages))

    def copy(self, holder: str, src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        self._sync("copy", holder, src, dst, src_start, dst_start, length)

    def mask(self, holder: str, page: int, masked: list[bool]) -> None:
        self._sync("mask", holder, page, list(masked))

    def export(self, holder: str, name: str, pages: list[int], meta: str, persistent: bool) -> None:
        self._sync("export", holder, name, list(pages), meta, persistent)

    def import_(self, holder: str, name: str) -> tuple[list[int], str]:
        return self.wait(self.import_later(holder, name))

    def import_later(self, holder: str, name: str) -> Pending:
        """import_ without waiting for the reply: completes with (pages, meta)."""
        imported = Pending()
        self._call("import_", holder, name).on_done(
            lambda reply: imported.fail(reply.error) if reply.error else
            imported.complete((list(reply.value[0]), reply.value[1])))
        return imported

    def unexport(self, holder: str, name: str) -> None:
        self._sync("unexport", holder, name)

    def list_exports(self, prefix: str = "") -> list[str]:
        return list(self._sync("list_exports", "", prefix))

    def cache_lookup(self, holder: str, hashes: list[bytes]) -> list[int]:
        return list(self._sync("cache_lookup", holder, list(hashes)))

    def cache_store(self, holder: str, hashes: list[bytes], pages: list[int]) -> int:
        return self._sync("cache_store", holder, list(hashes), list(pages))

    def forward(self, holder: str, request: ForwardRequest) -> Pending:
        return self._call("forward", holder, request)

    def read_pages(self, holder: str, pages: list[int]) -> Pending:
        return self._call("read_pages", holder, list(pages))

    def write_pages(self, holder: str, pages: list[int], data: bytes) -> Pending:
        return self._call("write_pages", holder, list(pages), data)

    def holding(self, holder: str) -> tuple[list[list], list[str]]:
        pages, exports = self._sync("holding", holder)
        return [list(p) for p in pages], list(exports)

    def release(self, holder: str) -> None:
        try:
            self._sync("release", holder)
        except WorkerUnavailable:
            pass  # the worker is gone, and with it everything the inferlet held there

    def hold(self) -> None:
        """Until flush(), forward passes made on this thread wait, then go out together."""
        self._holder = threading.get_ident()

    def flush(self) -> None:
        """Send the passes held since hold(), and stop holding."""
        self._holder = None
        self._send_held()

    @property
    def broken(self) -> str | None:
        """Why the connection is lost, or None while it stands."""
        return self._conn.broken

    def close(self) -> None:
        self._conn.close()

    # -- the connection --------------------------------------------------------------------------
    def _call(self, method: str, holder: str, *args) -> Pending:
        """Send a call; its Pending completes with the value, or fails with the worker's error."""
        pending, message = self._conn.register(method, holder, args)
        if message is None:
            return pending
        if self._holder == threading.get_ident():
            if method == "forward":
                now = time.perf_counter()
                if not self._held:
                    self._held_since = now
                self._held.append(message)
                if now - self._held_since >= MAX_HOLD_S:
                    self._send_held()  # a long round: let the worker start on what it has
                return pending
            self._send_held()  # calls reach the worker in the order they were made
        self._conn.send(message)
        return pending

    def _send_held(self) -> None:
        held, self._held = self._held, []  # only the holding thread touches _held
        for message in held:
            self._conn.send(message)

    def _sync(self, method: str, holder: str, *args):
        return self.wait(self._call(method, holder, *args))

    def wait(self, pending: Pending):
        """The value of one of this worker's Pendings; WorkerUnavailable when it does not answer in time."""
        return self._conn.wait(pending)
