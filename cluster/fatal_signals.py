"""Keep wasmtime's trap handlers when Ray starts in this process.

wasmtime turns a guest's trap (an `unreachable`, an out-of-bounds access) into an error through
its handlers for SIGILL, SIGSEGV, SIGBUS and SIGFPE, installed when the process makes its first
Engine. ray.init installs Ray's crash handlers for the same signals over them, and a guest trap
after that kills the whole process ("Illegal instruction") instead of ending one inferlet. A
process that made an Engine before starting Ray (a driver hosting inferlets, a test session)
starts Ray inside `kept_signal_handlers()`: the handlers that were there before come back; where
there were none, Ray's stay. (Ray's worker processes start Ray first and make Engines after, so
wasmtime's handlers come last there and chain to Ray's.)
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

SIGNALS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE)
_SIGACTION_BYTES = 256  # glibc's struct sigaction (152 bytes on x86-64 and aarch64), copied whole


@contextlib.contextmanager
def kept_signal_handlers():
    """Put back, on leaving, each of SIGNALS' handlers that was installed on entering (Linux)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = {}
    for sig in SIGNALS:
        action = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if libc.sigaction(int(sig), None, action) == 0 and ctypes.cast(action, ctypes.POINTER(ctypes.c_void_p))[0]:
            saved[sig] = action  # a handler (the first field is not SIG_DFL)
    try:
        yield
    finally:
        for sig, action in saved.items():
            libc.sigaction(int(sig), action, None)
