"""The shape of a Llama-family model, read from a GGUF header or a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from workers.errors import UnsupportedModelError

# architectures this model code runs, with their Hugging Face class names
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # also SmolLM / SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
    num_layers: int
    hidden_size: int
    intermediate_size: int  # FFN width
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int  # positions are in [0, max_position)
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style "llama3" scaling, or None
    name: str = ""
    # the sliding-window attention span that capped max_position (None: it did not): attention is never
    # windowed here, so a sequence may not grow past the window, where the window would start to matter
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.num_heads} query heads do not divide into {self.num_kv_heads} KV heads")

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for transformers (used to build the reference model and by the weight cache)."""
        d = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.architecture == "llama":
            d["attention_bias"] = self.qkv_bias
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "") -> ModelConfig:
        model_type = d.get("model_type", "")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {d['hidden_act']!r} is not supported (silu only)")
        heads = d["num_attention_heads"]
        max_position = int(d.get("max_position_embeddings", 4096))
        window = d.get("sliding_window")
        capped_by_window = None
        if window and (model_type == "mistral" or d.get("use_sliding_window")) and int(window) < max_position:
            # full attention equals sliding-window attention while a sequence fits the window;
            # we do not mask by window, so sequences may not grow past it
            max_position = capped_by_window = int(window)
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        rope_params = d.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in ("llama3", "default"):
            raise UnsupportedModelError(f"rope scaling {rope_scaling!r} is not supported (llama3 only)")
        return cls(
            architecture=model_type,
            num_layers=d["num_hidden_layers"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            vocab_size=d["vocab_size"],
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position=max_position,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_scaling=rope_scaling if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3" else None,
            name=name,
            sliding_window=capped_by_window,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))
