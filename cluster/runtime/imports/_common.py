"""What the import modules share: the Import record and how sync / async imports are wrapped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import guarded, guarded_async, plain_err


@dataclass(frozen=True)
class Import:
    fn: Callable  # sync: fn(*args) -> value; async: fn(*args) -> Pending
    is_async: bool = False


def sync(fn: Callable, err=plain_err) -> Import:
    """An import answering at once; refusals become err(message)."""
    guarded_fn = guarded(fn, err)
    return Import(lambda *args: guarded_fn(None, *args))


def raw(fn: Callable) -> Import:
    """An import that cannot fail (no result<>): called as fn(*args)."""
    return Import(fn)


def waiting(session: InferletSession, fn: Callable[..., Pending], err=plain_err) -> Import:
    """An import that may wait: the inferlet is suspended until fn's Pending is done."""
    start = guarded_async(fn, err)
    return Import(lambda *args: session.track(start(*args)), is_async=True)


def timeout_s(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else timeout_ms / 1000.0
