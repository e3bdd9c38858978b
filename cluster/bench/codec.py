"""The handler-call codec's cost: size and encode+decode time of typical calls and replies.

    python -m cluster.bench.codec
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from cluster.rpc.handler_codec import Call, Reply, decode_call, decode_reply, encode_call, encode_reply
from workers.step_types import ForwardRequest, OutputResult, Sampler

def _best_us(round_trip: Callable[[], Any], repeats: int) -> float:
    """The best of five runs of `repeats` calls, in microseconds per call."""
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            round_trip()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def main(repeats: int = 2000) -> None:
    """Print the size and the encode+decode time of typical handler calls and replies."""
    vocab, page_size = 49152, 16  # SmolLM2
    rng = np.random.default_rng(0)
    pages = np.arange(40, dtype=np.int64)
    decode = ForwardRequest(np.array([1234]), np.array([600]), pages, 9, np.array([0]),
                            (Sampler("sample", temperature=0.7, top_p=0.9, seed=1),))
    prefill = ForwardRequest(rng.integers(0, vocab, 512), np.arange(512), pages[:512 // page_size], page_size,
                             np.array([511]), (Sampler("greedy", allowed=rng.random(vocab) < 0.1),))
    for label, request in (("call: decode, 1 token", decode), ("call: prefill, 512 tokens + logit mask", prefill)):
        call = Call(7, "forward", "inferlet-0123", (request,))
        us = _best_us(lambda: decode_call(encode_call(call)), repeats)
        print(f"{label:40s} {len(encode_call(call)):6d} bytes  encode+decode {us:6.1f} us")
    reply = Reply(7, [OutputResult(token=42)])
    us = _best_us(lambda: decode_reply(encode_reply(reply)), repeats)
    print(f"{'reply: one sampled token':40s} {len(encode_reply(reply)):6d} bytes  encode+decode {us:6.1f} us")


if __name__ == "__main__":
    main()
