"""Runs every inferlet of a host on one thread, each in its own store.

An inferlet runs until it waits on an async import (a forward pass, a pull, a sleep) or
has used YIELD_FUEL more fuel (cluster/runtime/sandbox.py) and yields; the thread then polls the
next ready inferlet. When the Pending an inferlet waits on completes (on the executor
thread, a timer, another inferlet's push), it is queued to run again. So 200 inferlets
waiting on one batched step cost one pass over the ready queue, not 200 thread wake-ups.

Limits: fuel traps a guest that computes too much; a timer ends one that lives past its
wall-clock limit (also while it waits); memory is capped per store. However a task ends,
its session is released and its outcome set exactly once.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import wasmtime
from wasmtime import component as wc

from cluster.runtime import fatal_signals, imports, wasm_async
from cluster.runtime.sandbox import YIELD_FUEL, Limits, Sandbox
from cluster.runtime.session import InferletSession
from cluster.services.timers import Timers

log = logging.getLogger("pie.scheduler")

# wasmtime's trap messages -> what to tell the client
_TRAP_CAUSES = {
    "all fuel consumed": "it used up its CPU limit (fuel)",
    "call stack exhausted": "its stack overflowed",
    "out of bounds memory access": "it accessed memory out of bounds",
    "`unreachable` instruction executed": (
        "it trapped (wasm `unreachable`: the guest's runtime aborted). A Python guest does this when a value "
        "it passes to an import does not match the import's WIT type (componentize-py checks the type without "
        "saying which): check the call against inferlets/wit/inferlet.wit"),
}


def trap_cause(error: Exception) -> str:
    text = str(error)
    for needle, cause in _TRAP_CAUSES.items():
        if needle in text:
            return cause
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"it trapped ({last[-1] if last else type(error).__name__})"


class Task:
    """One inferlet from start to end; `on_end(error)` is called once (error None on success)."""

    def __init__(self, session: InferletSession, component: wc.Component, limits: Limits,
                 on_end: Callable[[str | None], None]):
        self.session = session
        self.component = component
        self.limits = limits
        self.on_end = on_end
        self.store: wasmtime.Store | None = None
        self.call: wasm_async.AsyncCall | None = None
        self.ended = False
        self.started = time.perf_counter()
        self.polls = 0
        self._deadline = None


class Scheduler:
    def __init__(self, sandbox: Sandbox, timers: Timers, hold: Callable[[], None], flush: Callable[[], None]):
        """`hold()` and `flush()` run on the scheduler thread around each round of polls (a remote
        worker sends the round's passes together at flush)."""
        self.sandbox = sandbox
        self.timers = timers
        self._hold, self._flush = hold, flush
        self._cond = threading.Condition()
        self._ready: collections.deque[Task] = collections.deque()
        self._queued: set[int] = set()
        self._commands: collections.deque[tuple] = collections.deque()
        self._running: set[Task] = set()
        self._closed = False
        self.poll_seconds = 0.0  # time inside polls: guests' wasm plus the host imports they call
        self._thread = threading.Thread(target=self._loop, name="inferlets", daemon=True)
        self._thread.start()

    @property
    def num_running(self) -> int:
        return len(self._running)

    def start(self, task: Task) -> None:
        self._command(("start", task))

    def kill(self, task: Task, reason: str) -> None:
        """End a task from any thread (client gone, limit reached, shutdown)."""
        self._command(("kill", task, reason))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for task in list(self._running):
                self._commands.append(("kill", task, "the host is shutting down"))
            self._cond.notify()
        self._thread.join(10)

    def _command(self, command: tuple) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._commands.append(command)
            self._cond.notify()

    def _wake(self, task: Task) -> None:
        with self._cond:
            if id(task) not in self._queued and not task.ended:
                self._queued.add(id(task))
                self._ready.append(task)
                self._cond.notify()

    # -- the scheduler thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._ready:
                    if self._closed and not self._running:
                        return
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                ready = list(self._ready)
                self._ready.clear()
                self._queued.clear()
            for sig in fatal_signals.restore():  # Ray (re)started or stopped in this process since the last round
                log.warning("signal %d's handler was replaced (by Ray?): wasmtime's is back, so a guest trap "
                            "stays an error", sig)
            for command in commands:
                try:
                    if command[0] == "start":
                        self._begin(command[1])
                    else:
                        self._end(command[1], f"inferlet {command[1].session.instance_id} stopped: {command[2]}")
                except Exception:  # never let one task's failure stop the thread
                    log.exception("scheduler command %s failed", command[0])
            self._hold()
            try:
                for task in ready:
                    self._poll(task)
            finally:
                try:
                    self._flush()
                except Exception:
                    log.exception("flushing the round's calls failed")

    def _begin(self, task: Task) -> None:
        self._running.add(task)
        session = task.session
        try:
            task.store = self.sandbox.new_store(task.limits)
            wasm_async.yield_every_fuel(task.store, YIELD_FUEL)
            linker = self.sandbox.new_linker()
            imports.define(linker, session)
            instance = wasm_async.instantiate(linker, task.store, task.component)
            run = instance.get_func(task.store, "run")
            if run is None:
                raise _Refused("the component exports no `run` function: is it built for the inferlet world?")
            task.call = wasm_async.AsyncCall(task.store, run)
        except _Refused as e:
            self._end(task, str(e))
            return
        except wasmtime.WasmtimeError as e:
            self._end(task, f"the component cannot be instantiated in the inferlet world: {e}")
            return
        session.wake = lambda: self._wake(task)
        task._deadline = self.timers.call_later(
            task.limits.wall_seconds, lambda: self._kill_quietly(task, "it ran past its wall-clock limit "
                                                                 f"({task.limits.wall_seconds:g} s)"))
        self._wake(task)

    def _kill_quietly(self, task: Task, reason: str) -> None:
        try:
            self.kill(task, reason)
        except RuntimeError:
            pass  # closing: the scheduler ends every task itself

    def _poll(self, task: Task) -> None:
        if task.ended:
            return
        task.polls += 1
        t0 = time.perf_counter()
        finished = task.call.poll()
        self.poll_seconds += time.perf_counter() - t0
        if not finished:
            waiting_on = task.session.outstanding
            if waiting_on is None or waiting_on.done:  # it yielded (fuel), or its result is in
                self._wake(task)
            return
        try:
            result = task.call.result()
        except wasmtime.WasmtimeError as e:
            self._end(task, f"inferlet {task.session.instance_id} stopped: {trap_cause(e)}")
            return
        self._end(task, result if isinstance(result, str) else None)

    def _end(self, task: Task, error: str | None) -> None:
        if task.ended:
            return
        task.ended = True
        self._running.discard(task)
        if task._deadline is not None:
            task._deadline.cancel()
        if task.call is not None:
            task.call.cancel()
        task.call = None
        task.store = None  # drop the instance and its memory
        try:
            task.session.release()
        except Exception:
            log.exception("releasing %s failed", task.session.instance_id)
        task.on_end(error)


class _Refused(Exception):
    pass
