"""workers.load_model: the GGUF weight cache, and errors for everything it cannot load."""
import json
import os

import pytest
import torch

import workers
from helpers import ProgressLog, build_tiny_model, hf_logprobs, max_abs_diff
from workers import ModelLoadError, UnsupportedModelError, weight_cache
from workers.model_config import ModelConfig
from workers.model_loader import default_gguf_path
from workers.tokenizer import TokenizerSpec


def quiet(*args):
    return None


def test_second_load_comes_from_the_weight_cache(first_load, session_cache_dir):
    first, first_log = first_load
    assert "converting GGUF tensors" in first_log.stages  # the session's first load converted
    log = ProgressLog()
    second = workers.load_model(progress=log)
    assert "converting GGUF tensors" not in log.stages
    assert any("weight cache" in stage for stage in log.stages)
    assert second.cache_dir is not None and second.cache_dir == first.cache_dir
    assert os.path.commonpath([second.cache_dir, session_cache_dir]) == session_cache_dir
    assert second.config == first.config
    assert second.tokenizer == first.tokenizer
    assert second.source == first.source == default_gguf_path()
    assert sorted(second.weights) == sorted(first.weights)
    for name, w in first.weights.items():
        assert second.weights[name].dtype == torch.float32
        assert torch.equal(second.weights[name], w), name  # tolerance: none, a lossless fp32 round trip


def test_load_by_name_and_by_path_agree(smollm2):
    by_path = workers.load_model(default_gguf_path(), progress=quiet)
    assert by_path.cache_dir == smollm2.cache_dir
    assert by_path.config == workers.load_model("smollm2", progress=quiet).config == smollm2.config


def test_cache_entry_is_a_model_directory_transformers_opens(smollm2, hf32, chat_ids):
    from transformers import AutoModelForCausalLM

    cached = AutoModelForCausalLM.from_pretrained(smollm2.cache_dir, dtype=torch.float32).eval()
    ids = chat_ids[:12]
    # tolerance: 1e-4 max abs log-prob difference; identical fp32 weights, same library
    assert max_abs_diff(hf_logprobs(cached, ids), hf_logprobs(hf32, ids)) < 1e-4


def test_hf_directory_loads_without_a_cache_entry(tmp_path):
    build_tiny_model(str(tmp_path), "qwen2")
    loaded = workers.load_model(str(tmp_path), progress=quiet)
    assert loaded.cache_dir is None and loaded.source == str(tmp_path)
    assert loaded.config.architecture == "qwen2" and loaded.config.qkv_bias
    assert loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.stop_token_ids == (2,)  # "</s>" in the word-level vocabulary


def tiny_cache_entry(key: str) -> str:
    config = ModelConfig(architecture="llama", num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2,
                         num_kv_heads=1, head_dim=4, vocab_size=10, rope_theta=1e4, rms_norm_eps=1e-5,
                         max_position=32, tie_word_embeddings=True)
    weights = {"model.embed_tokens.weight": torch.randn(10, 8), "model.norm.weight": torch.ones(8)}
    spec = TokenizerSpec(tokenizer_json="{}", chat_template=None, bos_token=None, eos_token=None)
    directory = weight_cache.store(key, config, weights, spec)
    loaded = weight_cache.load(key)
    assert loaded is not None and loaded[0] == config and torch.equal(loaded[1]["model.norm.weight"], torch.ones(8))
    return directory


DAMAGE = {
    "weights missing": lambda d: os.remove(os.path.join(d, "model.safetensors")),
    "weights truncated": lambda d: truncate(os.path.join(d, "model.safetensors"), 100),
    "weights empty": lambda d: truncate(os.path.join(d, "model.safetensors"), 0),
    "config not JSON": lambda d: open(os.path.join(d, "model_config.json"), "w").write("{"),
    "config from another schema": lambda d: open(os.path.join(d, "model_config.json"), "w").write('{"arch": 1}'),
}


def truncate(path: str, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_unreadable_cache_entry_counts_as_missing(damage):
    """weight_cache.load returns None for an unreadable entry, so load_model converts again."""
    key = "test-" + damage.replace(" ", "-")
    DAMAGE[damage](tiny_cache_entry(key))
    assert weight_cache.load(key) is None


# --- errors ----------------------------------------------------------------------------------------

def expect_load_error(spec, *words, kind=ModelLoadError):
    with pytest.raises(kind) as e:
        workers.load_model(spec, progress=quiet)
    for w in words:
        assert w in str(e.value), str(e.value)
    return e.value


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.gguf")
    expect_load_error(missing, missing)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    expect_load_error(str(path), str(path), ".gguf")


def test_directory_without_config(tmp_path):
    expect_load_error(str(tmp_path), "config.json")


def test_directory_with_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    expect_load_error(str(tmp_path), "config.json", "JSON")


def write_config(directory, **fields):
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, **fields}
    (directory / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture(tmp_path):
    write_config(tmp_path, model_type="gpt2")
    err = expect_load_error(str(tmp_path), "gpt2", kind=UnsupportedModelError)
    assert isinstance(err, ModelLoadError)


def test_unsupported_activation(tmp_path):
    write_config(tmp_path, hidden_act="gelu")
    expect_load_error(str(tmp_path), "gelu", kind=UnsupportedModelError)


def test_directory_without_weights(tmp_path):
    write_config(tmp_path)
    expect_load_error(str(tmp_path), "safetensors")


def test_directory_without_tokenizer(tmp_path):
    build_tiny_model(str(tmp_path), "llama")
    os.remove(tmp_path / "tokenizer.json")
    expect_load_error(str(tmp_path), "tokenizer.json")


def test_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    expect_load_error(str(path), str(path))


def test_empty_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_load_error(str(path), str(path))


@pytest.mark.parametrize("length", [24, 2_000, 1_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, length):
    """The real file cut inside its header, its metadata, its tensor index, and its tensor data."""
    path = tmp_path / "truncated.gguf"
    with open(default_gguf_path(), "rb") as src:
        path.write_bytes(src.read(length))
    expect_load_error(str(path), str(path))
