"""Shared helpers of the inference-layer tests: building step requests, reading log-probabilities
back from an executor, the transformers reference, and tiny random-weight Hugging Face models.

The executor contract exposes no raw logits; a "logprobs" sampler over the whole vocabulary gives
log_softmax(logits), which is what every numeric comparison here uses (logits up to a per-row
constant, so a difference of e in the logits shows as at most 2e here).
"""
from __future__ import annotations

import contextlib
import time
import functools
import json
import os

import numpy as np
import torch

from workers import ForwardRequest, Sampler, pack_batch


CHAT_QUESTION = "What is the capital of France?"  # greedy SmolLM2 answers "The capital of France is Paris."


class ProgressLog:
    """A progress callback that remembers the stages it was told about."""

    def __init__(self):
        self.stages: list[str] = []

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.stages.append(stage)


# --- requests ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def all_token_ids(vocab_size: int) -> tuple[int, ...]:
    return tuple(range(vocab_size))


def full_logprobs(vocab_size: int, allowed: np.ndarray | None = None) -> Sampler:
    """A sampler returning log-probabilities of every token: the executor's logits, normalized."""
    return Sampler(kind="logprobs", token_ids=all_token_ids(vocab_size), allowed=allowed)


def pages_needed(kv_len: int, page_size: int) -> int:
    return -(-kv_len // page_size)


def make_request(tokens, pages, page_size: int, start: int = 0, outputs=(), samplers=(),
                 positions=None, mask=None) -> ForwardRequest:
    """A request writing `tokens` into KV slots [start, start + len(tokens)) of `pages`.

    `start` is the number of KV slots already filled (the history); positions default to the
    slot indices. The pages must be exactly those holding the start + len(tokens) slots.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    kv_len = start + len(tokens)
    assert len(pages) == pages_needed(kv_len, page_size), (len(pages), kv_len, page_size)
    if positions is None:
        positions = np.arange(start, kv_len)
    return ForwardRequest(
        token_ids=tokens, position_ids=np.asarray(positions, dtype=np.int64),
        kv_page_indices=np.asarray(pages, dtype=np.int64),
        kv_last_page_len=kv_len - (len(pages) - 1) * page_size,
        output_indices=np.asarray(outputs, dtype=np.int64), samplers=tuple(samplers), attention_mask=mask)


def logprobs_request(executor, tokens, pages, start: int = 0, outputs=None, positions=None, mask=None):
    """make_request with a full-vocabulary logprobs output at each index of `outputs` (default: all)."""
    if outputs is None:
        outputs = range(len(tokens))
    outputs = list(outputs)
    sampler = full_logprobs(executor.info.vocab_size)
    return make_request(tokens, pages, executor.info.page_size, start, outputs, [sampler] * len(outputs),
                        positions, mask)


def step_logprobs(executor, requests) -> list[np.ndarray]:
    """Run one step of full-vocabulary logprobs requests; one [num_outputs, vocab] array per request."""
    out = executor.step(pack_batch(list(requests)))
    rows = [r.logprobs for r in out.results]
    result, k = [], 0
    for r in requests:
        n = len(r.output_indices)
        result.append(np.stack(rows[k:k + n]) if n else np.zeros((0, executor.info.vocab_size), np.float32))
        k += n
    return result


def prefill_logprobs(executor, tokens, pages=None) -> np.ndarray:
    """[len(tokens), vocab] log-probabilities after each token, from one prefill step."""
    with allocated(executor, pages_needed(len(tokens), executor.info.page_size)) as fresh:
        return step_logprobs(executor, [logprobs_request(executor, tokens, pages or fresh)])[0]


def wait_until(condition, timeout_s: float = 60.0, what: str = "the condition") -> None:
    """Poll condition() every 20 ms until it holds; fail the test naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s} s")
        time.sleep(0.02)


def settled(host) -> None:
    """Wait until an InferletHost's queued page operations and passes have run (they hold page pins)."""
    host.worker.batcher.flush().wait(60)


@contextlib.contextmanager
def allocated(executor, n: int):
    """n pages of the executor for the duration of a block; freed afterwards."""
    pages = executor.allocate_pages(n)
    assert pages is not None, f"test needs {n} free pages, executor has {executor.num_free_pages}"
    try:
        yield pages
    finally:
        executor.free_pages(pages)


# --- the transformers reference ---------------------------------------------------------------

@torch.no_grad()
def hf_logprobs(model, tokens, positions=None) -> np.ndarray:
    """[len(tokens), vocab] float32 log-probabilities of a transformers causal LM over one sequence.

    An explicit all-ones attention mask goes with explicit position ids: without it transformers
    reads non-contiguous position ids as several packed sequences and masks across them.
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).unsqueeze(0)
    kwargs = {"attention_mask": torch.ones_like(ids)}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions, dtype=np.int64)).unsqueeze(0)
    logits = model(input_ids=ids, **kwargs).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# --- tiny random-weight Hugging Face models ---------------------------------------------------

WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from or had by "
         "hot word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find").split()
SPECIAL = ["[UNK]", "<s>", "</s>"]
TINY_TEXT = "the people who write it know what time it was when she said that one day we will find water"


def write_word_tokenizer(directory: str) -> int:
    """A word-level tokenizer.json (the `tokenizers` library) in `directory`; returns its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return len(vocab)


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Replace every parameter with values that make each part of the model matter.

    transformers initializes biases to zero, norms to one and weights small; a model loader that
    dropped a bias, swapped a norm or misread a projection would still match such a model. Here
    weights are ~N(0, 1/fan_in), embeddings ~N(0, 1), biases ~N(0, 0.5) and norm scales ~1 +- 0.3.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "norm" in name:
            p.copy_(1 + 0.3 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.5 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)


def build_tiny_model(directory: str, model_type: str, seed: int = 0, **overrides):
    """Save a random-weight transformers model of `model_type` with a word-level tokenizer into
    `directory` (config.json, model.safetensors, tokenizer.json); return the fp32 model, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(directory, exist_ok=True)
    vocab = write_word_tokenizer(directory)
    shape = dict(TINY_SHAPE, vocab_size=vocab + 3)  # a few ids beyond the tokenizer: the model covers it
    shape.update(overrides)
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory)
    return model


# --- little HTTP servers standing in for tools ----------------------------------------------------

def http_reply(handler, status: int, body: bytes) -> None:
    """Answer a BaseHTTPRequestHandler's request with `body` and its length."""
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def http_server(handler_class, **attributes):
    """A ThreadingHTTPServer on a free loopback port, serving on a thread; `attributes` set on it."""
    import threading
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512  # read when it starts listening: a hundred agents connect at once

    server = Server(("127.0.0.1", 0), handler_class)
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()


# --- the client API --------------------------------------------------------------------------------

def recording_uploads(client, monkeypatch) -> list:
    """The UploadChunks a PieClient sends from now on (each Upload call's chunks as gRPC takes them)."""
    sent, upload = [], client._stub.Upload

    def record(chunks):
        for chunk in chunks:
            sent.append(chunk)
            yield chunk
    monkeypatch.setattr(client._stub, "Upload", lambda chunks, **kw: upload(record(chunks), **kw))
    return sent
