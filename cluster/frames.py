"""Batching queued messages into gRPC frames: both ends of the handler-call stream send this way.

Whatever is queued when a frame goes out goes with it, so a busy side pays one gRPC message for
many calls or replies, and an idle side sends each at once. Put END on the queue to end the stream.
"""
from __future__ import annotations

import queue
from typing import Iterator

END = object()


def frames(outbox: queue.SimpleQueue) -> Iterator[list[bytes]]:
    """Lists of the queued messages, each as soon as one is there, until END."""
    while (first := outbox.get()) is not END:
        batch = [first]
        while True:
            try:
                item = outbox.get_nowait()
            except queue.Empty:
                break
            if item is END:
                outbox.put(END)  # seen by the next round, after this batch goes out
                break
            batch.append(item)
        yield batch
