"""Chained hashes of full KV pages of tokens, the keys of a prefix index (as vLLM's prefix-caching
block hashes): a prompt matches cached pages exactly when their first k pages of tokens agree."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence

import numpy as np


def block_hashes(tokens: Sequence[int], page_size: int, cache_key: str = "") -> Iterator[bytes]:
    """The chained hash of each full page of `tokens`: block i hashes (block i-1's hash, its
    page_size token ids). The chain starts from `cache_key` (the model, and an adapter or tenant
    where they matter), so equal tokens under another key never match."""
    ids = np.asarray(tokens, dtype="<i8").reshape(-1)
    parent = hashlib.blake2b(cache_key.encode(), digest_size=16).digest()
    for start in range(0, len(ids) - page_size + 1, page_size):
        parent = hashlib.blake2b(parent + ids[start:start + page_size].tobytes(), digest_size=16).digest()
        yield parent


def tokens_from_sdk_meta(meta: str) -> list[int]:
    """The token ids a pie_sdk Context's export holds slot by slot, read from its meta; [] when
    the meta is not the SDK's or the tokens do not fill the slots one to one (pages dropped).
    Slots masked before the export are not visible in the meta: a masked prefix still indexes."""
    try:
        state = json.loads(meta)
        tokens, kv_len = state["tokens"], state["kv_len"]
    except (ValueError, KeyError, TypeError):
        return []
    if state.get("sdk") != 1 or not isinstance(tokens, list) or len(tokens) != kv_len:
        return []
    return tokens if all(isinstance(t, int) for t in tokens) else []
