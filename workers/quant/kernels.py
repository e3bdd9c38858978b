"""Builds kernels.cpp once per machine with the C++ compiler torch uses, and loads it.

The build is cached under $PIE_KERNEL_CACHE (default: <cache home>/kernels), in a folder named
by the hash of the source and the flags, so an edit or another CPU kind builds afresh and a
second load takes milliseconds. AVX2/FMA code is compiled in only when this CPU has both;
otherwise the portable loops are (correct, slower).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

from workers.errors import ModelLoadError
from workers.progress import ProgressFn, StderrProgress
from workers.weight_cache import cache_home

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
    if "f16c" in cpu:
        flags += ["-mf16c"]
    return flags


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("PIE_KERNEL_CACHE") or Path(cache_home()) / "kernels")


def load(progress: ProgressFn | None = None) -> ModuleType:
    """The compiled kernels (built on the first call on this machine, ~30-60 s)."""
    global _module
    with _lock:
        if _module is None:
            _module = _build(progress or StderrProgress("quant"))
        return _module


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja`; the pip package puts it in the venv, which may not be on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # the build below fails and says what to install
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build(progress: ProgressFn) -> ModuleType:
    from torch.utils import cpp_extension

    _ninja_on_path()
    flags = compile_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    name = f"pie_quant_{key}"
    build_dir = kernel_cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        progress("compiling the quantized CPU kernels (once per machine, about a minute)", 0, 1)
    try:
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise ModelLoadError(
            f"cannot build the quantized CPU kernels ({type(e).__name__}: {str(e).strip()[-400:]}); "
            "they need a C++ compiler (g++) and ninja: install them (apt-get install g++ ninja-build, or "
            "pip install ninja), or run with --quant none") from e
    if fresh:
        progress("compiling the quantized CPU kernels (once per machine, about a minute)", 1, 1)
    return module
