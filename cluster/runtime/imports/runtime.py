"""runtime: arguments, identity, client messages, sleep, clock, log."""
from __future__ import annotations

import logging
import time

from cluster.runtime.imports._common import raw, timeout_s, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused

log = logging.getLogger("pie.inferlet")
MAX_LOG_CHARS = 4096


def imports(s: InferletSession) -> dict:
    def send(message: str) -> Pending:
        size = len(message.encode())
        if size > s.limits.max_message_bytes:
            raise Refused(f"message of {size} bytes exceeds the limit of {s.limits.max_message_bytes}")
        room = s.on_message(message)  # a Pending when the client's outbox is full: wait for the reader
        return room if isinstance(room, Pending) else Pending.ready(None)

    def sleep(ms: int) -> Pending:
        pending = Pending()
        s.services.timers.call_later(ms / 1000.0, lambda: pending.complete(None))
        return pending

    return {
        "get-arguments": raw(lambda: list(s.arguments)),
        "instance-id": raw(lambda: s.instance_id),
        "send": waiting(s, send),
        "receive": waiting(s, lambda timeout_ms: s.receive(timeout_s(timeout_ms)), err=None),
        "sleep": waiting(s, sleep, err=None),
        "log": raw(lambda message: log.info("[%s] %s", s.instance_id, message[:MAX_LOG_CHARS])),
        "now-ms": raw(lambda: int(time.time() * 1000)),
    }
