"""A disk cache of converted weights, so a model's second load skips conversion.

Each entry is a directory that transformers can also open: config.json, model.safetensors
(fp32, Hugging Face names), tokenizer.json, plus our own model_config.json and
tokenizer_meta.json. Entries are written to a temporary directory and renamed into place,
so a crash never leaves a half entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch

from workers.model_config import ModelConfig
from workers.tokenizer import TokenizerSpec

CONVERTER_VERSION = 1  # bump when conversion output changes, to invalidate old entries


def cache_home() -> str:
    """Where pie-cluster keeps its caches: $PIE_CACHE_DIR, else ~/.cache/pie-cluster."""
    return os.environ.get("PIE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pie-cluster")


def cache_root() -> str:
    return os.path.join(cache_home(), "models")


def source_key(path: str) -> str:
    """Identity of a source file: its absolute path, size and modification time."""
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def entry_dir(key: str) -> str:
    return os.path.join(cache_root(), key)


def load(key: str) -> tuple[ModelConfig, dict[str, torch.Tensor], TokenizerSpec] | None:
    """The cached entry, or None when there is none (or it is unreadable)."""
    from safetensors.torch import load_file

    d = entry_dir(key)
    try:
        with open(os.path.join(d, "model_config.json")) as f:
            config = ModelConfig.from_json(f.read())
        with open(os.path.join(d, "tokenizer.json")) as f, open(os.path.join(d, "tokenizer_meta.json")) as g:
            tokenizer = TokenizerSpec.from_json(g.read(), f.read())
        weights = load_file(os.path.join(d, "model.safetensors"))
    except Exception:  # missing, truncated or from another version: convert again
        return None
    return config, weights, tokenizer


def store(key: str, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: TokenizerSpec) -> str:
    from safetensors.torch import save_file

    final = entry_dir(key)
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root())
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        files = {
            "config.json": json.dumps(config.to_hf_dict(), indent=1),
            "model_config.json": config.to_json(),
            "tokenizer.json": tokenizer.tokenizer_json,
            "tokenizer_meta.json": tokenizer.to_json(),
        }
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.path.exists(final):
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
