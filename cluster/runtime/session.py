"""One running inferlet's state on its host: identity, limits, held handles, client channels.

The imports (cluster/runtime/imports/) act on a session; the scheduler (cluster/runtime/scheduler.py) runs
its wasm and resumes it when the Pending it waits on is done. `release` gives back
everything the inferlet held, however it ended.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from cluster.pending import Pending
from cluster.runtime.wit_values import Refused

if TYPE_CHECKING:
    from cluster.runtime.host_services import HostServices
    from cluster.runtime.sandbox import Limits


class InferletEnded(Refused):
    """A message for an inferlet that has ended: nobody will read it."""


@dataclass
class PassInFlight:
    pending: Pending  # completes with the converted outputs (or fails); its pages stay pinned until then


class InferletSession:
    def __init__(self, instance_id: str, arguments: list[str], services: HostServices, limits: Limits,
                 on_message: Callable[[str], None], cache_scope: str = ""):
        self.instance_id = instance_id
        self.cache_scope = cache_scope  # program and tenant: whose prefix-cache pages this inferlet may reuse
        self.arguments = list(arguments)
        self.services = services
        self.limits = limits
        self.on_message = on_message
        self.passes: dict[int, PassInFlight] = {}
        self.matchers: dict[int, object] = {}
        self.next_handle = 1
        self.tokens = 0  # input tokens of the passes it submitted (the status page's count)
        # the Pending the inferlet's current async import waits on (the scheduler's wake-up signal)
        self.outstanding: Pending | None = None
        self.wake: Callable[[], None] = lambda: None  # set by the scheduler
        self._inbox: collections.deque[str] = collections.deque()
        self._receivers: collections.deque[Pending] = collections.deque()
        self._lock = threading.Lock()
        self.ended = False

    def new_handle(self) -> int:
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        return handle

    def track(self, pending: Pending) -> Pending:
        """The inferlet now waits on `pending`; wake it when done."""
        self.outstanding = pending
        pending.on_done(lambda _: self.wake())
        return pending

    # -- messages from the client ----------------------------------------------------------------
    def deliver(self, message: str) -> None:
        """A client message for this inferlet: to a waiting receive(), else to its inbox."""
        size = len(message.encode())
        if size > self.limits.max_message_bytes:
            raise Refused(f"message of {size} bytes exceeds the limit of {self.limits.max_message_bytes}")
        with self._lock:
            if self.ended:
                raise InferletEnded(f"inferlet {self.instance_id} has ended")
            while self._receivers:
                receiver = self._receivers.popleft()
                if not receiver.done:
                    break
            else:
                if len(self._inbox) >= self.limits.max_inbox_messages:
                    raise Refused(f"inferlet {self.instance_id} has {len(self._inbox)} unread messages; "
                                  f"wait until it reads some")
                self._inbox.append(message)
                return
        receiver.complete(message)

    def receive(self, timeout_s: float | None) -> Pending:
        with self._lock:
            if self._inbox:
                return Pending.ready(self._inbox.popleft())
            pending = Pending()
            self._receivers.append(pending)
        if timeout_s is not None:
            timer = self.services.timers.call_later(timeout_s, lambda: pending.complete(None))
            pending.on_done(lambda _: timer.cancel())
        return pending

    # -- ending ----------------------------------------------------------------------------------
    def release(self) -> None:
        """Give back pages, exports, subscriptions, matchers; wake nobody. Idempotent."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
            receivers, self._receivers = list(self._receivers), collections.deque()
        for r in receivers:
            r.complete(None)
        self.matchers.clear()
        self.services.bus.drop(self.instance_id)
        self.services.worker.release(self.instance_id)
