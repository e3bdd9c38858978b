"""grammar: host-side matchers for constrained decoding (llguidance, see cluster/services/grammar.py)."""
from __future__ import annotations

from cluster.runtime.imports._common import raw, sync
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused

MAX_MATCHERS = 64  # per inferlet


def imports(s: InferletSession) -> dict:
    def matcher(handle: int):
        m = s.matchers.get(handle)
        if m is None:
            raise Refused(f"no grammar matcher with handle {handle}; compile one first")
        return m

    def compile_(kind: str, source: str) -> int:
        if len(source) > s.limits.max_text_bytes:
            raise Refused(f"a grammar source of {len(source)} characters exceeds the limit of "
                          f"{s.limits.max_text_bytes} (max_text_bytes)")
        if len(s.matchers) >= MAX_MATCHERS:
            raise Refused(f"this inferlet already has {MAX_MATCHERS} grammar matchers; release some")
        handle = s.new_handle()
        s.matchers[handle] = s.services.grammars().compile(kind, source)
        return handle

    return {
        "compile": sync(compile_),
        "next-mask": sync(lambda h: matcher(h).allowed_bitmask()),
        "accept": sync(lambda h, token: matcher(h).accept(token)),
        "rollback": sync(lambda h, count: matcher(h).rollback(count)),
        "is-finished": sync(lambda h: matcher(h).is_finished()),
        "release": raw(lambda h: s.matchers.pop(h, None) and None),
    }
