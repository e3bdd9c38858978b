"""Watermarking: every token is drawn from a "green list", half the vocabulary chosen by a key and
the previous token (Kirchenbauer et al.), given to the executor as the pass's allowed-token mask.
Anyone with the key can tell the text apart: nearly every token of it is green, against about half
of any other text's. --detect scores a text instead of writing one.

    pie run inferlets/examples/decoding/watermark.py -- --prompt "Write about the sea." --key 42
    pie run inferlets/examples/decoding/watermark.py -- --detect "some text" --key 42
"""
import argparse
import json
import random

from pie_sdk import Context, model_info, sample, send
from pie_sdk.runtime import unwrap
from wit_world.imports import model


def green_bits(key: int, previous: int, vocab: int) -> int:
    """The green list after `previous`, as one integer: bit t set = token t is green."""
    return random.Random(key * 1_000_003 + previous).getrandbits(vocab)


def as_words(bits: int, vocab: int) -> list:
    """The allowed-token bitmask of the forward API: bit t of word t // 32."""
    return [(bits >> (32 * i)) & 0xFFFFFFFF for i in range(-(-vocab // 32))]


def green_fraction(tokens: list, key: int, vocab: int) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return sum(green_bits(key, p, vocab) >> t & 1 for p, t in pairs) / max(len(pairs), 1)


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="watermark")
    ap.add_argument("--prompt", default="Write about the sea.")
    ap.add_argument("--detect", default=None, help="score this text instead of generating")
    ap.add_argument("--key", type=int, default=42)
    ap.add_argument("--max-tokens", type=int, default=32)
    opts = ap.parse_args(args)
    info = model_info()
    vocab, stops = info.vocab_size, set(info.stop_tokens)
    if opts.detect is not None:
        tokens = list(unwrap(model.encode, opts.detect))
        send(json.dumps({"green_fraction": green_fraction(tokens, opts.key, vocab), "tokens": len(tokens)}))
        return
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        previous, generated = ctx.pending[-1], []
        for _ in range(opts.max_tokens):
            allowed = as_words(green_bits(opts.key, previous, vocab), vocab)
            token = ctx.step(sample(0.7, seed=len(generated)), allowed=allowed)
            if token in stops:
                break
            generated.append(token)
            ctx.fill_tokens([token])
            previous = token
    text = unwrap(model.decode, generated)
    send(json.dumps({"text": text, "tokens": generated, "green_fraction": green_fraction(generated, opts.key, vocab)}))
