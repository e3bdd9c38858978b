"""Uploaded programs (WebAssembly components), stored by content: the id of a program is the
sha256 hex digest of its bytes, so the same bytes uploaded twice are one program.

Programs live on disk under the cache directory (one file per id, written to a temporary name
and renamed into place, so a reader never sees half a program) and are checked before they are
kept: not empty, under the size limit, a component rather than a core module or other bytes,
matching the digest the uploader declared, and whatever the caller's `validate` checks (the
server compiles it).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.errors import InvalidComponentError, ProgramTooLarge, UnknownProgram
from cluster.runtime.inferlet_build import cache_dir
from cluster.runtime.sandbox import MAX_COMPONENT_BYTES

_WASM_MAGIC = b"\0asm"
_COMPONENT_LAYER = b"\x0d\x00\x01\x00"  # version and layer of the component binary format
_CORE_MODULE_LAYER = b"\x01\x00\x00\x00"
_PROGRAM_ID = re.compile(r"[0-9a-f]{64}")


def default_directory() -> Path:
    return cache_dir() / "programs"


def program_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StoredProgram:
    program_id: str  # sha256 hex digest of the component
    path: Path  # the component on disk
    size: int  # bytes
    already_present: bool  # stored before this put()


class ProgramStore:
    """Content-addressed components on disk. Thread-safe: files are only ever created whole."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = MAX_COMPONENT_BYTES):
        self.directory = Path(directory) if directory is not None else default_directory()
        self.max_bytes = max_bytes

    def check_size(self, size: int) -> None:
        """Raise ProgramTooLarge when a program of `size` bytes would be over the limit."""
        if size > self.max_bytes:
            raise ProgramTooLarge(f"the program is {size} bytes; this server takes at most {self.max_bytes}. "
                                  f"Build a smaller component or start the server with a higher limit")

    def path(self, program_id: str) -> Path:
        """Where the program is; raises UnknownProgram when it is not stored."""
        if _PROGRAM_ID.fullmatch(program_id):
            path = self.directory / f"{program_id}.wasm"
            if path.is_file():
                return path
        raise UnknownProgram(f"no program {program_id!r} on this server; upload it first "
                             f"(its id is the sha256 hex digest the upload returns)")

    def has(self, program_id: str) -> bool:
        try:
            self.path(program_id)
            return True
        except UnknownProgram:
            return False

    def put(self, data: bytes, expected_sha256: str = "",
            validate: Callable[[Path], None] | None = None) -> StoredProgram:
        """Check and keep `data`; `validate(path)` may raise InvalidComponentError to refuse it."""
        self.check_size(len(data))
        check_component_bytes(data)
        program_id = program_id_of(data)
        if expected_sha256 and expected_sha256.lower() != program_id:
            raise InvalidComponentError(f"the upload's sha256 is {program_id}, not the declared {expected_sha256}: "
                                        f"bytes were lost or changed on the way; upload again")
        if self.has(program_id):
            return StoredProgram(program_id, self.path(program_id), len(data), already_present=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=self.directory, prefix=program_id[:16], suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if validate is not None:
                validate(Path(partial))
            final = self.directory / f"{program_id}.wasm"
            os.replace(partial, final)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return StoredProgram(program_id, final, len(data), already_present=False)


def check_component_bytes(data: bytes) -> None:
    """Refuse what cannot be a WebAssembly component, with what it looks like instead."""
    if not data:
        raise InvalidComponentError("the upload is empty; send the bytes of a .wasm component")
    if data[:4] != _WASM_MAGIC:
        raise InvalidComponentError("the upload is not WebAssembly (it does not start with \\0asm); "
                                    "send a .wasm component, e.g. one `pie build` made")
    if data[4:8] == _CORE_MODULE_LAYER:
        raise InvalidComponentError("the upload is a core WebAssembly module, not a component; "
                                    "build the inferlet with `pie build` (componentize-py)")
    if data[4:8] != _COMPONENT_LAYER:
        raise InvalidComponentError(f"the upload has an unknown WebAssembly version/layer {data[4:8].hex()}; "
                                    f"expected a component ({_COMPONENT_LAYER.hex()})")
