"""The host side of the inferlet world: the imports one running inferlet may call.

An InferletSession is one inferlet's view of the system: the KV pages it owns, its submitted
forward passes, its quotas. Every import checks ownership and limits and answers misuse with
the world's `err(string)`, never an exception: an exception raised in a host function would
cross wasmtime-py's one global error slot, which concurrent inferlet threads share.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
from wasmtime import component as wc

from cluster.sandbox import Limits
from workers.errors import WorkerError
from workers.executor import Executor
from workers.step_types import ForwardRequest, Sampler, pack_batch
from workers.step_validation import StepLimits, validate_batch

log = logging.getLogger("pie.inferlet")


class Refused(Exception):
    """An import's answer is err(message)."""


def _ok(value=None):
    return value


def _tagged_ok(value):  # result<string, string>: both cases are strings, so the case is named
    return wc.Variant("ok", value)


def _tagged_err(message: str):
    return wc.Variant("err", message)


def _guarded(fn: Callable, err: Callable[[str], object] = lambda m: m) -> Callable:
    """Wrap an import: Refused and worker errors become err(message); anything else is logged."""

    def call(store, *args):
        try:
            return fn(*args)
        except (Refused, WorkerError, ValueError) as e:
            return err(str(e))
        except Exception as e:  # a host bug: report it to the guest, keep the server alive
            log.exception("host import %s failed", fn.__name__)
            return err(f"internal error in {fn.__name__}: {type(e).__name__}")

    return call


def _record(**fields) -> wc.Record:
    r = wc.Record()
    for name, value in fields.items():
        setattr(r, name.replace("_", "-"), value)
    return r


class InferletSession:
    def __init__(self, instance_id: str, arguments: list[str], executor: Executor, executor_lock: threading.Lock,
                 limits: Limits, on_message: Callable[[str], None]):
        self.instance_id = instance_id
        self.arguments = list(arguments)
        self.executor = executor
        self.executor_lock = executor_lock
        self.limits = limits
        self.on_message = on_message
        self.owned: set[int] = set()
        self.submitted: dict[int, ForwardRequest] = {}
        self.finished: dict[int, list] = {}
        self._next_handle = 1
        info = executor.info
        self._step_limits = StepLimits(info.num_pages, info.page_size, info.vocab_size, info.max_position)

    # -- wiring ---------------------------------------------------------------------------------
    def define(self, linker: wc.Linker) -> None:
        imports = {
            "pie:inferlet/runtime@0.1.0": {
                "get-arguments": lambda store: list(self.arguments),
                "instance-id": lambda store: self.instance_id,
                "send": _guarded(self.send),
                "log": lambda store, message: log.info("[%s] %s", self.instance_id, message[:4096]),
                "now-ms": lambda store: int(time.time() * 1000),
            },
            "pie:inferlet/model@0.1.0": {
                "info": lambda store: self.model_info(),
                "encode": lambda store, text: self.executor.tokenizer.encode(text),
                "decode": _guarded(lambda tokens: _tagged_ok(self.decode(tokens)), _tagged_err),
                "apply-chat-template": _guarded(lambda messages, add: _tagged_ok(self.chat(messages, add)),
                                                _tagged_err),
            },
            "pie:inferlet/kv@0.1.0": {
                "allocate": _guarded(self.allocate),
                "free": _guarded(self.free),
                "copy": _guarded(self.copy),
                "mask": _guarded(self.mask),
            },
            "pie:inferlet/forward@0.1.0": {
                "submit": _guarded(self.submit),
                "wait": _guarded(self.wait),
            },
        }
        with linker.root() as root:
            for interface, funcs in imports.items():
                with root.add_instance(interface) as inst:
                    for name, fn in funcs.items():
                        inst.add_func(name, fn)

    def release(self) -> None:
        """Free every page the inferlet still holds: called however it ended."""
        with self.executor_lock:
            if self.owned:
                self.executor.free_pages(sorted(self.owned))
        self.owned.clear()
        self.submitted.clear()
        self.finished.clear()

    # -- runtime and model -----------------------------------------------------------------------
    def send(self, message: str) -> None:
        size = len(message.encode())
        if size > self.limits.max_message_bytes:
            raise Refused(f"message of {size} bytes exceeds the limit of {self.limits.max_message_bytes}")
        self.on_message(message)

    def model_info(self) -> wc.Record:
        info = self.executor.info
        return _record(name=info.name, vocab_size=info.vocab_size, page_size=info.page_size,
                       max_position=info.max_position, stop_tokens=list(info.stop_token_ids))

    def decode(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not 0 <= t < self.executor.info.vocab_size]
        if bad:
            raise Refused(f"token {bad[0]} is outside the vocabulary [0, {self.executor.info.vocab_size})")
        return self.executor.tokenizer.decode(tokens)

    def chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        return self.executor.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], add_generation_prompt)

    # -- KV pages --------------------------------------------------------------------------------
    def _require_owned(self, pages) -> None:
        foreign = [p for p in pages if p not in self.owned]
        if foreign:
            raise Refused(f"page {foreign[0]} is not owned by this inferlet")

    def allocate(self, count: int) -> list[int]:
        if len(self.owned) + count > self.limits.max_pages:
            raise Refused(f"allocating {count} pages exceeds this inferlet's quota of {self.limits.max_pages} "
                          f"(it holds {len(self.owned)})")
        with self.executor_lock:
            pages = self.executor.allocate_pages(count)
        if pages is None:
            raise Refused(f"the worker has fewer than {count} free KV pages; free some or retry later")
        self.owned.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        self._require_owned(pages)
        if len(set(pages)) != len(pages):
            raise Refused("a page is listed twice")
        with self.executor_lock:
            self.executor.free_pages(pages)
        self.owned.difference_update(pages)

    def copy(self, src: int, dst: int, src_start: int, dst_start: int, length: int) -> None:
        self._require_owned([src, dst])
        with self.executor_lock:
            self.executor.copy_slots(src, dst, src_start, dst_start, length)

    def mask(self, page: int, masked: list[bool]) -> None:
        self._require_owned([page])
        with self.executor_lock:
            self.executor.mask_slots(page, masked)

    # -- forward passes --------------------------------------------------------------------------
    def submit(self, p) -> int:
        if len(self.submitted) >= self.limits.max_outstanding_passes:
            raise Refused(f"more than {self.limits.max_outstanding_passes} passes outstanding; wait for some")
        request = self._to_request(p)
        validate_batch(pack_batch([request]), self._step_limits)
        handle = self._next_handle
        self._next_handle += 1
        self.submitted[handle] = request
        return handle

    def wait(self, handle: int) -> list:
        if handle not in self.submitted and handle not in self.finished:
            raise Refused(f"no pass with handle {handle} is outstanding")
        if handle in self.submitted:  # run everything submitted so far in one step
            handles = list(self.submitted)
            requests = [self.submitted.pop(h) for h in handles]
            with self.executor_lock:
                results = self.executor.step(pack_batch(requests)).results
            k = 0
            for h, r in zip(handles, requests):
                self.finished[h] = [_output(x) for x in results[k:k + len(r.samplers)]]
                k += len(r.samplers)
        return self.finished.pop(handle)

    def _to_request(self, p) -> ForwardRequest:
        field = lambda name: getattr(p, name)
        tokens, pages = field("tokens"), field("pages")
        self._require_owned(pages)
        outputs = field("outputs")
        kv_len = (len(pages) - 1) * self.executor.info.page_size + field("last-page-len") if pages else 0
        mask = field("mask")
        return ForwardRequest(
            token_ids=np.asarray(tokens, dtype=np.int64),
            position_ids=np.asarray(field("positions"), dtype=np.int64),
            kv_page_indices=np.asarray(pages, dtype=np.int64),
            kv_last_page_len=field("last-page-len"),
            output_indices=np.asarray([o.index for o in outputs], dtype=np.int64),
            samplers=tuple(self._sampler(o) for o in outputs),
            attention_mask=None if mask is None else _decode_mask(mask, len(tokens), kv_len),
        )

    def _sampler(self, spec) -> Sampler:
        allowed = spec.allowed
        if allowed is not None:
            allowed = _unpack_bitmask(allowed, self.executor.info.vocab_size)
        s = spec.sampler
        if s is None:
            return Sampler("greedy", allowed=allowed)
        if isinstance(s, wc.Record):
            return Sampler("sample", temperature=s.temperature, top_k=getattr(s, "top-k"),
                           top_p=getattr(s, "top-p"), min_p=getattr(s, "min-p"), seed=s.seed, allowed=allowed)
        if isinstance(s, tuple):
            return Sampler("distribution", top_k=s[0], temperature=s[1], allowed=allowed)
        return Sampler("logprobs", token_ids=tuple(s), allowed=allowed)


def _unpack_bitmask(words: list[int], vocab_size: int) -> np.ndarray:
    need = -(-vocab_size // 32)
    if len(words) != need:
        raise Refused(f"the allowed-token bitmask has {len(words)} words; the vocabulary needs {need}")
    bits = np.unpackbits(np.asarray(words, dtype="<u4").view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def _decode_mask(rows: list[list[int]], q_len: int, kv_len: int) -> np.ndarray:
    """Run-length rows (attend, skip, attend, ...) -> [q_len, kv_len] bool."""
    if len(rows) != q_len:
        raise Refused(f"the attention mask has {len(rows)} rows for {q_len} tokens")
    mask = np.zeros((q_len, kv_len), dtype=bool)
    for i, runs in enumerate(rows):
        if sum(runs) != kv_len:
            raise Refused(f"attention mask row {i} covers {sum(runs)} slots; the KV sequence has {kv_len}")
        values = np.arange(len(runs)) % 2 == 0
        mask[i] = np.repeat(values, runs)
    return mask


def _output(result):
    if result.token is not None:
        return result.token
    if result.ids is not None:
        return (result.ids.tolist(), result.probs.tolist())
    return result.logprobs.tolist()
