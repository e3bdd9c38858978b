"""forward: submit passes (batched with every other inferlet's) and wait for their outputs."""
from __future__ import annotations

import numpy as np
from wasmtime import component as wc

from cluster.runtime.imports._common import sync, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession, PassInFlight
from cluster.runtime.wit_values import Refused
from workers.step_types import ForwardRequest, Sampler


OUTPUTS_PER_TOKEN = 4  # output specs per input token (a sampled token and its top alternatives are two)


def imports(s: InferletSession) -> dict:
    info = s.services.info
    worker = s.services.worker

    def submit(p) -> int:
        if len(s.passes) >= s.limits.max_outstanding_passes:
            raise Refused(f"more than {s.limits.max_outstanding_passes} passes outstanding; wait for some")
        request = to_request(s, p, info.page_size, info.vocab_size)
        result = worker.forward(s.instance_id, request)  # checks the pass and the caller's pages
        converted = result.map(lambda outputs: [_output(x) for x in outputs])
        handle = s.new_handle()
        s.passes[handle] = PassInFlight(converted)
        return handle

    def take(handle: int) -> Pending:
        flight = s.passes.pop(handle, None)
        if flight is None:
            raise Refused(f"no pass with handle {handle} is outstanding")
        return flight.pending

    def wait_all(handles: list[int]) -> Pending:
        if len(set(handles)) != len(handles):
            raise Refused("a handle is listed twice")
        missing = [h for h in handles if h not in s.passes]
        if missing:
            raise Refused(f"no pass with handle {missing[0]} is outstanding")
        parts = [take(h) for h in handles]
        together = Pending()
        remaining = [len(parts)]

        def one_done(_):
            remaining[0] -= 1
            if remaining[0] == 0:
                failed = next((p.error for p in parts if p.error is not None), None)
                together.fail(failed) if failed else together.complete([p.value for p in parts])

        if not parts:
            together.complete([])
        for p in parts:
            p.on_done(one_done)
        return together

    return {
        "submit": sync(submit),
        "wait": waiting(s, take),
        "wait-all": waiting(s, wait_all),
    }


def check_sizes(limits, p, page_size: int, vocab_size: int) -> int:
    """Refuse a pass whose sizes are out of bounds before anything is allocated for it (a mask's
    run lengths are summed, not expanded); returns its KV length."""
    tokens, pages, last, mask = p.tokens, p.pages, getattr(p, "last-page-len"), p.mask
    if not 1 <= len(tokens) <= limits.max_pass_tokens:
        raise Refused(f"a pass has {len(tokens)} input tokens; it needs 1 to {limits.max_pass_tokens} (max_pass_tokens)")
    if len(p.positions) != len(tokens):
        raise Refused(f"a pass has {len(p.positions)} positions for {len(tokens)} tokens")
    if not 1 <= len(pages) <= limits.max_pass_pages:
        raise Refused(f"a pass lists {len(pages)} pages; it needs 1 to {limits.max_pass_pages} (max_pass_pages)")
    if not 1 <= last <= page_size:
        raise Refused(f"last-page-len {last} is outside [1, page size {page_size}]")
    kv_len = (len(pages) - 1) * page_size + last
    if len(p.outputs) > OUTPUTS_PER_TOKEN * len(tokens):
        raise Refused(f"a pass asks {len(p.outputs)} outputs of its {len(tokens)} tokens; at most "
                      f"{OUTPUTS_PER_TOKEN} per token")
    for spec in p.outputs:
        if isinstance(spec.sampler, list) and not 1 <= len(spec.sampler) <= vocab_size:
            raise Refused(f"a logprobs sampler lists {len(spec.sampler)} tokens; it needs 1 to {vocab_size}")
    if mask is not None:
        if len(mask) != len(tokens):
            raise Refused(f"the attention mask has {len(mask)} rows for {len(tokens)} tokens")
        if len(tokens) * kv_len > limits.max_mask_cells:
            raise Refused(f"a custom mask of {len(tokens)} tokens x {kv_len} slots exceeds {limits.max_mask_cells} "
                          f"cells (max_mask_cells): split the pass")
        for i, runs in enumerate(mask):
            if len(runs) > kv_len + 1 or sum(runs) != kv_len:
                raise Refused(f"attention mask row {i} covers {sum(runs)} slots in {len(runs)} runs; "
                              f"the KV sequence has {kv_len}")
    return kv_len


def to_request(s: InferletSession, p, page_size: int, vocab_size: int) -> ForwardRequest:
    field = lambda name: getattr(p, name)
    tokens, pages = field("tokens"), field("pages")
    outputs = field("outputs")
    kv_len = check_sizes(s.limits, p, page_size, vocab_size)
    s.tokens += len(tokens)
    mask = field("mask")
    return ForwardRequest(
        token_ids=np.asarray(tokens, dtype=np.int64),
        position_ids=np.asarray(field("positions"), dtype=np.int64),
        kv_page_indices=np.asarray(pages, dtype=np.int64),
        kv_last_page_len=field("last-page-len"),
        output_indices=np.asarray([o.index for o in outputs], dtype=np.int64),
        samplers=tuple(_sampler(s, o, vocab_size) for o in outputs),
        attention_mask=None if mask is None else decode_mask(mask, len(tokens), kv_len),
    )


def _sampler(s: InferletSession, spec, vocab_size: int) -> Sampler:
    allowed = spec.allowed
    if allowed is not None:
        allowed = unpack_bitmask(allowed, vocab_size)
    if spec.grammar is not None:
        matcher = s.matchers.get(spec.grammar)
        if matcher is None:
            raise Refused(f"no grammar matcher with handle {spec.grammar}")
        by_grammar = unpack_bitmask(matcher.allowed_bitmask(), vocab_size)
        allowed = by_grammar if allowed is None else allowed & by_grammar
    sampler, with_logprob = spec.sampler, getattr(spec, "with-logprob")
    if sampler is None:
        return Sampler("greedy", allowed=allowed, with_logprob=with_logprob)
    if isinstance(sampler, wc.Record):
        return Sampler("sample", temperature=sampler.temperature, top_k=getattr(sampler, "top-k"),
                       top_p=getattr(sampler, "top-p"), min_p=getattr(sampler, "min-p"), seed=sampler.seed,
                       allowed=allowed, with_logprob=with_logprob)
    if isinstance(sampler, tuple):
        return Sampler("distribution", top_k=sampler[0], temperature=sampler[1], allowed=allowed)
    return Sampler("logprobs", token_ids=tuple(sampler), allowed=allowed)


def unpack_bitmask(words: list[int], vocab_size: int) -> np.ndarray:
    need = -(-vocab_size // 32)
    if len(words) != need:
        raise Refused(f"the allowed-token bitmask has {len(words)} words; the vocabulary needs {need}")
    bits = np.unpackbits(np.asarray(words, dtype="<u4").view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def decode_mask(rows: list[list[int]], q_len: int, kv_len: int) -> np.ndarray:
    """Run-length rows (attend, skip, attend, ...) -> [q_len, kv_len] bool; the rows' count and
    sums are check_sizes's to refuse, before this allocates."""
    mask = np.zeros((q_len, kv_len), dtype=bool)
    for i, runs in enumerate(rows):
        mask[i] = np.repeat(np.arange(len(runs)) % 2 == 0, runs)
    return mask


def _output(result) -> wc.Variant:
    if result.token is not None:
        if result.logprob is not None:
            return wc.Variant("token-logprob", (result.token, result.logprob))
        return wc.Variant("token", result.token)
    if result.ids is not None:
        return wc.Variant("distribution", (result.ids.tolist(), result.probs.tolist()))
    return wc.Variant("logprobs", result.logprobs.tolist())
