"""The worker side of the handler-call service: a LocalWorker's handlers served to many hosts.

Each host keeps one bidirectional stream (cluster/proto/worker.proto). Calls are decoded and
run as they arrive: page calls answer at once, a forward pass answers when its batched step
is done, so passes from every host share steps in the one batcher. When a stream ends, the
worker releases every inferlet that called through it: a host that dies leaks no pages.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from concurrent import futures

import grpc

from cluster.frames import END, MESSAGE_LIMITS, frames
from cluster.handler_codec import Call, Reply, decode_call, encode_reply
from cluster.local_worker import LocalWorker
from cluster.pending import Pending
from cluster.proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger("pie.worker")

def describe(worker: LocalWorker) -> dict:
    """What a host needs to know about the worker's model: its info and its tokenizer."""
    spec = worker.tokenizer.spec
    return {"info": dataclasses.asdict(worker.info), "tokenizer_meta": spec.to_json(),
            "tokenizer_json": spec.tokenizer_json}


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: LocalWorker):
        self.worker = worker
        w = worker
        self._handlers = {  # method -> fn(holder, *args); forward returns a Pending
            "describe": lambda holder: describe(w),
            "num_free_pages": lambda holder: w.executor.num_free_pages,
            "allocate": w.allocate, "free": w.free, "copy": w.copy, "mask": w.mask,
            "export": w.export, "import_": w.import_, "unexport": w.unexport,
            "list_exports": lambda holder, prefix: w.list_exports(prefix),
            "forward": w.forward, "release": w.release,
            "read_pages": w.read_pages, "write_pages": w.write_pages,
        }

    def Calls(self, incoming, context):
        replies: queue.SimpleQueue = queue.SimpleQueue()
        holders: set[str] = set()
        threading.Thread(target=self._read, args=(incoming, replies, holders), name="worker-calls",
                         daemon=True).start()
        try:
            for batch in frames(replies):
                yield worker_pb2.Frame(messages=batch)
        finally:
            for holder in holders:  # the host is gone: nothing it held may stay held
                self.worker.release(holder)

    def _read(self, incoming, replies: queue.SimpleQueue, holders: set[str]) -> None:
        try:
            for frame in incoming:
                self.worker.hold()  # one wake-up of the executor thread for the frame's passes
                try:
                    for message in frame.messages:
                        self._run(decode_call(message), replies, holders)
                finally:
                    self.worker.flush()
        except Exception as e:  # the stream broke or a frame was garbage: end the connection
            if not isinstance(e, grpc.RpcError):
                log.exception("handler-call stream failed")
        finally:
            replies.put(END)

    def _run(self, call: Call, replies: queue.SimpleQueue, holders: set[str]) -> None:
        answer = lambda reply: replies.put(encode_reply(reply))
        fn = self._handlers.get(call.method)
        if fn is None:
            answer(Reply.failure(call.call_id, ValueError(f"no handler {call.method!r} on this worker")))
            return
        if call.holder:
            holders.add(call.holder)
        try:
            value = fn(call.holder, *call.args)
        except Exception as e:
            answer(Reply.failure(call.call_id, e))
            return
        if isinstance(value, Pending):  # a forward pass: answered when its step is done
            value.on_done(lambda r: answer(Reply.failure(call.call_id, r.error) if r.error
                                           else Reply(call.call_id, r.value)))
            return
        if call.method == "release":
            holders.discard(call.holder)
        answer(Reply(call.call_id, value))


class WorkerServer:
    """A LocalWorker served on host:port (port 0: any free one); `target` is what hosts dial."""

    def __init__(self, worker: LocalWorker, address: str = "127.0.0.1", port: int = 0, max_hosts: int = 64):
        self.worker = worker
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_hosts, thread_name_prefix="worker-rpc"),
                                   options=[("grpc.so_reuseport", 0), *MESSAGE_LIMITS])
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(worker), self._server)
        self.port = self._server.add_insecure_port(f"{address}:{port}")
        self.target = f"{address}:{self.port}"
        self._server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()
