"""Python values as wasmtime-py expects them for the inferlet world's types, and import guards.

Records are `wc.Record` with dashed attribute names. A `result<T, string>` is the plain value
T on success and the plain error string on failure, except where T is itself string-like
(`result<string, string>`, `result<option<string>, string>`): those need the case named with
`wc.Variant("ok" | "err", payload)`.

Imports answer misuse with err(message), never an exception: a Python exception raised in a
host function traps the guest instead of telling it what was wrong.
"""
from __future__ import annotations

import logging
from typing import Callable

from wasmtime import component as wc

from cluster.errors import InferletError
from cluster.pending import Pending
from workers.errors import WorkerError

log = logging.getLogger("pie.inferlet")


class Refused(InferletError):
    """An import's answer is err(message)."""


REFUSALS = (InferletError, WorkerError, ValueError)  # errors whose message is the guest's answer


def record(**fields) -> wc.Record:
    r = wc.Record()
    for name, value in fields.items():
        setattr(r, name.replace("_", "-"), value)
    return r


def tagged_ok(value):
    return wc.Variant("ok", value)


def tagged_err(message: str):
    return wc.Variant("err", message)


def plain_err(message: str):
    return message


def guarded(fn: Callable, err: Callable[[str], object] = plain_err) -> Callable:
    """A sync import: refusals become err(message); a host bug is logged and reported, not raised."""

    def call(store, *args):
        try:
            return fn(*args)
        except REFUSALS as e:
            return err(str(e))
        except Exception as e:
            log.exception("host import %s failed", getattr(fn, "__name__", fn))
            return err(f"internal error in {getattr(fn, '__name__', 'an import')}: {type(e).__name__}")

    return call


def guarded_async(fn: Callable[..., Pending], err: Callable[[str], object] | None = plain_err) -> Callable:
    """An async import: fn(*args) -> Pending of the import's value. Refusals, raised or failed
    later, become err(message); with err=None (an import without a result<>), a refusal is a
    host bug and is logged with a neutral value returned."""

    def convert(p: Pending, out: Pending) -> None:
        if p.error is None:
            out.complete(p.value)
        elif err is not None and isinstance(p.error, REFUSALS):
            out.complete(err(str(p.error)))
        else:
            log.error("async import %s failed: %r", getattr(fn, "__name__", fn), p.error)
            out.complete(err(f"internal error: {type(p.error).__name__}") if err else None)

    def start(*args) -> Pending:
        try:
            p = fn(*args)
        except REFUSALS as e:
            if err is None:
                log.exception("async import %s refused", getattr(fn, "__name__", fn))
                return Pending.ready(None)
            return Pending.ready(err(str(e)))
        except Exception as e:
            log.exception("host import %s failed", getattr(fn, "__name__", fn))
            return Pending.ready(err(f"internal error: {type(e).__name__}") if err else None)
        out = Pending()
        p.on_done(lambda done: convert(done, out))
        return out

    return start
