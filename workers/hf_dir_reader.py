"""Reads a Hugging Face model directory: config.json, *.safetensors, tokenizer.json and its config."""
from __future__ import annotations

import glob
import json
import os

import torch

from workers.errors import ModelLoadError
from workers.model_config import ModelConfig
from workers.progress import ProgressFn, no_progress
from workers.tokenizer import TokenizerSpec


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(directory: str) -> TokenizerSpec:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise ModelLoadError(f"{directory} has no tokenizer.json; save the tokenizer with the model")
    with open(path) as f:
        tokenizer_json = f.read()
    tc = _read_json(os.path.join(directory, "tokenizer_config.json"))
    template = tc.get("chat_template")
    template_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.exists(template_file):
        with open(template_file) as f:
            template = f.read()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    gen = _read_json(os.path.join(directory, "generation_config.json"))
    cfg = _read_json(os.path.join(directory, "config.json"))
    eos_ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    eos_token = _token_text(tc.get("eos_token"))
    if eos_token is not None:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_str(tokenizer_json).token_to_id(eos_token)
        if eos_id is not None:
            eos_ids.append(eos_id)
    return TokenizerSpec(tokenizer_json=tokenizer_json, chat_template=template,
                         bos_token=_token_text(tc.get("bos_token")), eos_token=eos_token,
                         stop_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)))


def read_hf_dir(directory: str, name: str, progress: ProgressFn = no_progress):
    """(config, fp32 weights by HF name, tokenizer spec) of a safetensors model directory."""
    from safetensors import safe_open

    cfg = _read_json(os.path.join(directory, "config.json"))
    if not cfg:
        raise ModelLoadError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    config = ModelConfig.from_hf_dict(cfg, name=name)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights (.bin checkpoints are not read)")
    weights: dict[str, torch.Tensor] = {}
    for i, path in enumerate(files):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key).to(torch.float32)
        progress("reading safetensors shards", i + 1, len(files))
    return config, weights, read_tokenizer(directory)
