"""The worker side of the handler-call service: a LocalWorker's handlers served to many hosts.

Each host keeps one bidirectional stream (cluster/proto/worker.proto). Calls are decoded and
run as they arrive: page calls answer at once, a forward pass answers when its batched step
is done, so passes from every host share steps in the one batcher. When a stream ends, the
worker releases every inferlet that called through it: a host that dies leaks no pages.
"""
from __future__ import annotations

import dataclasses

from cluster.rpc.call_stream import CallServer, CallServicer
from cluster.worker.local_worker import LocalWorker
from cluster.proto import worker_pb2_grpc


def describe(worker: LocalWorker) -> dict:
    """What a host needs to know about the worker's model: its info and its tokenizer."""
    spec = worker.tokenizer.spec
    return {"info": dataclasses.asdict(worker.info), "tokenizer_meta": spec.to_json(),
            "tokenizer_json": spec.tokenizer_json}


class WorkerServicer(CallServicer):
    def __init__(self, worker: LocalWorker):
        self.worker = w = worker
        super().__init__({  # method -> fn(holder, *args); forward returns a Pending
            "describe": lambda holder: describe(w),
            "num_free_pages": lambda holder: w.executor.num_free_pages,
            "allocate": w.allocate, "free": w.free, "copy": w.copy, "mask": w.mask,
            "export": w.export, "import_": w.import_, "unexport": w.unexport,
            "list_exports": lambda holder, prefix: w.list_exports(prefix),
            "cache_lookup": w.cache_lookup, "cache_store": w.cache_store,
            "forward": w.forward, "release": w.release,
            "read_pages": w.read_pages, "write_pages": w.write_pages, "holding": w.holding,
        }, release=w.release, releasing="release",
            hold=w.hold, flush=w.flush)  # one wake-up of the executor thread for a frame's passes


class WorkerServer(CallServer):
    """A LocalWorker served on address:port (port 0: any free one); `target` is what hosts dial.
    With `token`, only hosts that send it are served."""

    def __init__(self, worker: LocalWorker, address: str = "127.0.0.1", port: int = 0, max_hosts: int = 64,
                 token: str | None = None):
        self.worker = worker
        super().__init__(worker_pb2_grpc.add_WorkerServicer_to_server, WorkerServicer(worker), address, port,
                         max_hosts, token, "worker")
