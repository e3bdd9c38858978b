"""Batching queued messages into gRPC frames: both ends of the handler-call stream send this way.

Whatever is queued when a frame goes out goes with it, so a busy side pays one gRPC message for
many calls or replies, and an idle side sends each at once. Put END on the queue to end the stream.
"""
from __future__ import annotations

import queue
from typing import Iterator

END = object()
FRAME_BYTES = 4 << 20  # a frame takes more queued messages only while it is smaller than this
MAX_MESSAGE_BYTES = 64 << 20  # one call or reply: page contents move in chunks well under it
# gRPC options for both ends: a frame holds at least one message, and FRAME_BYTES more at most
MESSAGE_LIMITS = (("grpc.max_send_message_length", MAX_MESSAGE_BYTES + FRAME_BYTES),
                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + FRAME_BYTES))


def frames(outbox: queue.SimpleQueue) -> Iterator[list[bytes]]:
    """Lists of the queued messages, each as soon as one is there, until END."""
    while (first := outbox.get()) is not END:
        batch, size = [first], len(first)
        while size < FRAME_BYTES:
            try:
                item = outbox.get_nowait()
            except queue.Empty:
                break
            if item is END:
                outbox.put(END)  # seen by the next round, after this batch goes out
                break
            batch.append(item)
            size += len(item)
        yield batch
