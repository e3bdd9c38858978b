"""Builds an inferlet's Python source into a WebAssembly component with componentize-py.

The component bundles the SDK (inferlets/sdk) and targets the `inferlet` world of
inferlets/wit. Builds are cached by the content hash of everything that goes in (the source,
the SDK, the WIT, the builder's version), so a second build of the same program is a file
lookup. A build that fails shows the inferlet's own file and line.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.errors import BuildError
from workers.progress import ProgressFn, StderrProgress
from workers.weight_cache import cache_home

INFERLETS_DIR = Path(__file__).resolve().parents[2] / "inferlets"
WIT_DIR = INFERLETS_DIR / "wit"
SDK_DIR = INFERLETS_DIR / "sdk"
WORLD = "inferlet"
BUILD_RECIPE = "wasip2-empty-ctx"  # change when the build command changes: it is part of the cache key

# the module componentize-py wraps: it binds the world's `run` export to the user's main()
_ENTRY = """\
import wit_world
import pie_sdk._entry
import {module} as _user_program


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        pie_sdk._entry.run_main(_user_program)
"""


_RUN_COMPONENTIZE_PY = "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())"


def cache_dir() -> Path:
    return Path(cache_home()) / "inferlets"


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def content_key(source: Path) -> str:
    """Hash of the source, the SDK, the WIT and the builder version: equal keys, equal components."""
    h = hashlib.sha256()
    h.update(importlib.metadata.version("componentize-py").encode())
    h.update(_ENTRY.encode() + BUILD_RECIPE.encode())
    h.update(source.name.encode() + b"\0" + source.read_bytes())
    for root in (SDK_DIR, WIT_DIR):
        for p in _tree_files(root):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:32]


def _module_name(source: Path) -> str:
    name = source.stem
    if not name.isidentifier() or name in ("wit_world", "pie_sdk", "app"):
        raise BuildError(f"{source}: the file name must be a Python module name (not {name!r})")
    return name


def build(source: str | os.PathLike, output: str | os.PathLike | None = None,
          progress: ProgressFn | None = None) -> Path:
    """Build `source` (a .py file) into a component; return its path (in the cache, or `output`)."""
    progress = progress or StderrProgress("build")
    source = Path(source).resolve()
    if source.suffix != ".py" or not source.is_file():
        raise BuildError(f"{source} is not a Python source file")
    module = _module_name(source)
    cached = cache_dir() / f"{content_key(source)}.wasm"
    if not cached.exists():
        _componentize(source, module, cached, progress)
    if output is None:
        return cached
    shutil.copyfile(cached, output)
    return Path(output)


def _componentize(source: Path, module: str, target: Path, progress: ProgressFn) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"building {source.name} (componentize-py, a few seconds)", 0, 1)
    with tempfile.TemporaryDirectory(prefix="pie-build-") as tmp:
        app_dir = Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "pie_inferlet_app.py").write_text(_ENTRY.format(module=module))
        out = Path(tmp) / "out.wasm"
        cmd = [sys.executable, "-c", _RUN_COMPONENTIZE_PY, "-d", str(WIT_DIR), "-w", WORLD, "componentize",
               "-p", str(app_dir), "-p", str(SDK_DIR), "-p", str(source.parent),
               "pie_inferlet_app", "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VIRTUAL_ENV": ""})
        if proc.returncode != 0 or not out.exists():
            raise BuildError(_build_error_message(source, proc.stdout + proc.stderr))
        partial = target.with_suffix(".partial")
        shutil.copyfile(out, partial)
        os.replace(partial, target)  # atomic: a reader never sees half a component
    progress(f"building {source.name} (componentize-py, a few seconds)", 1, 1)


def _build_error_message(source: Path, output: str) -> str:
    """The part of componentize-py's output about the user's program: its Python traceback and error,
    with the guest's paths (/N/name.py) replaced by the real file, and none of the builder's backtrace."""
    lines = output.splitlines()
    mine = [i for i, ln in enumerate(lines) if source.name in ln]
    if mine:
        start = max(0, mine[0] - 2)
        stop = next((j for j in range(start, len(lines))
                     if re.match(r"\s*(\d+: |Stack backtrace|Caused by)", lines[j])), len(lines))
        lines = lines[start:stop]
    text = "\n".join(ln for ln in lines[-20:] if ln.strip())
    text = re.sub(r"/\d+/" + re.escape(source.name), str(source), text)
    return f"building {source} failed:\n{text}"
