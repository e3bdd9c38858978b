"""Keep wasmtime's trap handlers in place, whatever else in the process installs.

wasmtime turns a guest's trap (an `unreachable`, an out-of-bounds access) into an error through
its handlers for SIGILL, SIGSEGV, SIGBUS and SIGFPE, installed when the process makes its first
Engine. Ray replaces them: ray.init installs its crash handlers over them and ray.shutdown resets
the signals to their defaults (observed in a test session; Serve does the same). After that a guest
trap kills the whole process ("Illegal instruction") instead of ending one inferlet.

`capture()` (at import) makes an Engine and records the handlers wasmtime installed;
`restore()` puts back any of them that something has replaced since, and the scheduler calls it
before each round of guest code (four sigaction reads when nothing changed). wasmtime's handlers
pass faults outside wasm on to the handlers that were there before them.
"""
from __future__ import annotations

import ctypes
import signal
import sys

import wasmtime

SIGNALS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE)
_SIGACTION_BYTES = 256  # glibc's struct sigaction (152 bytes on x86-64 and aarch64), copied whole
# PyDLL: sigaction is a few hundred nanoseconds, and a CDLL call would hand the GIL to any thread
# waiting for it (the executor's), which the scheduler then waits to get back, once per call
_libc = ctypes.PyDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_wasmtime: dict[int, ctypes.Array] = {}  # signal -> wasmtime's sigaction
_installed: dict[int, int] = {}  # signal -> wasmtime's handler address


def _action(sig: int) -> ctypes.Array:
    action = ctypes.create_string_buffer(_SIGACTION_BYTES)
    _libc.sigaction(sig, None, action)
    return action


def _handler(action: ctypes.Array) -> int:
    return ctypes.cast(action, ctypes.POINTER(ctypes.c_void_p))[0] or 0


def capture() -> None:
    """Record wasmtime's handlers (making an Engine installs them, once per process). Linux only."""
    if _libc is None:
        return
    wasmtime.Engine()
    for sig in SIGNALS:
        action = _action(int(sig))
        if _handler(action):
            _wasmtime[int(sig)] = action
            _installed[int(sig)] = _handler(action)


def restore() -> list[int]:
    """Put wasmtime's handlers back where another has replaced them; returns those signals."""
    replaced = []
    buffer = ctypes.create_string_buffer(_SIGACTION_BYTES)  # one per call: schedulers run on many threads
    in_place = ctypes.c_void_p.from_buffer(buffer)  # sa_handler, the struct's first field
    for sig, handler in _installed.items():
        _libc.sigaction(sig, None, buffer)
        if in_place.value != handler:
            replaced.append(sig)
    for sig in replaced:
        _libc.sigaction(sig, _wasmtime[sig], None)
    return replaced


capture()
