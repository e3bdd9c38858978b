"""msgpack payloads of the handler-call service between inferlet hosts and GPU workers.

A host sends `Call`s (call id, handler name, the calling inferlet, arguments); the worker
answers each with a `Reply` carrying the same call id and either the handler's value or the
error's kind (its class name) and message, so the host re-raises the same exception class.

Values are plain msgpack (None, bool, int, float, str, bytes, lists, maps) plus these types,
each a msgpack extension so a receiver knows what it holds without a schema:
- numpy arrays of ints, uints and floats: dtype, shape and the raw little-endian bytes (no
  per-element work). They decode as read-only views of the received message: copy to write.
- numpy bool arrays (attention masks, a sampler's `allowed` logit mask): packed 8 to a byte
  (these decode as fresh, writable arrays).
- workers.step_types ForwardRequest, Sampler and OutputResult, field by field.
Anything else is refused with CodecError when encoding, before it is sent.
"""
from __future__ import annotations

import math
import struct
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import msgpack
import numpy as np

import cluster.errors
import workers.errors
from cluster.errors import InferletError
from cluster.worker.page_registry import PageRefused
from workers.step_types import ForwardRequest, OutputResult, Sampler


class CodecError(InferletError):
    """A handler-call payload could not be encoded (an unsupported value) or decoded (malformed)."""


class RemoteError(InferletError):
    """The other side raised an error of a kind this side does not know; `kind` is its class name."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


_EXT_ARRAY = 1  # numpy array: dtype code, shape, bytes (see _encode_array)
_EXT_FORWARD = 2
_EXT_SAMPLER = 3
_EXT_OUTPUT = 4

_CALL, _REPLY_OK, _REPLY_ERROR = 0, 1, 2  # the first field of every envelope

# extensions inside extensions: a call's request holds samplers that hold arrays (3 deep)
_MAX_EXT_DEPTH = 4


# -- envelopes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    call_id: int  # unique among one connection's outstanding calls; its Reply carries it back
    method: str  # the handler, e.g. "forward", "allocate"
    holder: str  # instance id of the calling inferlet (the page holder on the worker)
    args: tuple  # the handler's positional arguments


@dataclass(frozen=True)
class Reply:
    call_id: int  # the Call this answers
    value: Any = None  # the handler's result; None when it failed
    error_kind: str = ""  # the raised exception's class name; "" on success
    error_message: str = ""

    @classmethod
    def failure(cls, call_id: int, error: BaseException) -> Reply:
        return cls(call_id, None, type(error).__name__, str(error))

    @property
    def ok(self) -> bool:
        return not self.error_kind

    def result(self, kinds: Mapping[str, type[BaseException]] | None = None) -> Any:
        """The value, or raise the error as its own class (looked up by name in `kinds`, by
        default ERROR_KINDS); a kind not there raises RemoteError naming it."""
        if self.ok:
            return self.value
        cls = (ERROR_KINDS if kinds is None else kinds).get(self.error_kind)
        if cls is None:
            raise RemoteError(self.error_kind, self.error_message)
        try:
            error = cls(self.error_message)
        except TypeError:  # a class whose constructor wants more than a message
            error = RemoteError(self.error_kind, self.error_message)
        raise error


def encode_call(call: Call) -> bytes:
    return encode_value([_CALL, call.call_id, call.method, call.holder, list(call.args)])


def decode_call(data: bytes) -> Call:
    message = decode_value(data)
    if not (isinstance(message, list) and len(message) == 5 and message[0] == _CALL):
        raise CodecError(f"expected a handler call, got {_describe(message)}")
    _, call_id, method, holder, args = message
    if not (isinstance(call_id, int) and isinstance(method, str) and isinstance(holder, str)
            and isinstance(args, list)):
        raise CodecError("a handler call needs an int id, a method name, a holder id and an argument list")
    return Call(call_id, method, holder, tuple(args))


def encode_reply(reply: Reply) -> bytes:
    if reply.ok:
        return encode_value([_REPLY_OK, reply.call_id, reply.value])
    return encode_value([_REPLY_ERROR, reply.call_id, reply.error_kind, reply.error_message])


def decode_reply(data: bytes) -> Reply:
    message = decode_value(data)
    if isinstance(message, list) and len(message) == 3 and message[0] == _REPLY_OK:
        return Reply(_int(message[1], "call id"), message[2])
    if (isinstance(message, list) and len(message) == 4 and message[0] == _REPLY_ERROR
            and isinstance(message[2], str) and message[2] and isinstance(message[3], str)):
        return Reply(_int(message[1], "call id"), None, message[2], message[3])
    raise CodecError(f"expected a handler reply, got {_describe(message)}")


# -- values -------------------------------------------------------------------------------------

def encode_value(value: Any) -> bytes:
    try:
        return msgpack.packb(value, default=_to_ext, use_bin_type=True)
    except (OverflowError, ValueError) as e:  # an int over 64 bits, a structure too deep or large
        raise CodecError(f"cannot encode a handler-call value: {e}") from e


def decode_value(data: bytes) -> Any:
    return _decode(data, 0)


def _decode(data: bytes, depth: int) -> Any:
    """Unpack one payload whose extensions sit `depth` extensions deep."""
    if depth > _MAX_EXT_DEPTH:  # a crafted payload nesting extensions would overflow the C stack
        raise CodecError(f"a handler-call payload nests extensions more than {_MAX_EXT_DEPTH} deep")
    try:
        return msgpack.unpackb(data, ext_hook=lambda code, ext: _from_ext(code, ext, depth + 1), raw=False,
                               strict_map_key=False)
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise CodecError(f"malformed handler-call payload: {e}") from e


def _to_ext(value: Any) -> msgpack.ExtType | Any:
    encode = _ENCODERS.get(type(value))
    if encode is not None:
        return encode(value)
    if isinstance(value, np.generic):  # a numpy scalar: its plain Python value
        return value.item()
    raise CodecError(f"cannot send a {type(value).__name__} over the handler-call service; use plain values, "
                     f"numpy arrays, ForwardRequest, Sampler or OutputResult")


def _from_ext(code: int, data: bytes, depth: int) -> Any:
    decode = _DECODERS.get(code)
    if decode is None:
        raise CodecError(f"unknown extension type {code} in a handler-call payload")
    return decode(data, depth)


# numpy arrays: [1 byte dtype code][1 byte ndim][ndim uint64 dims][data]; code 0 is a bool array
# packed 8 to a byte (np.packbits, little bit order), the others raw little-endian numbers

_BITS = 0
_WIRE_DTYPES = (None,) + tuple(np.dtype(s) for s in ("<i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8",
                                                      "<f2", "<f4", "<f8"))
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_WIRE_DTYPES) if dtype is not None}
_HEADERS = tuple(struct.Struct(f"<BB{ndim}Q") for ndim in range(65))  # by ndim (numpy allows 64)


def _encode_array(a: np.ndarray) -> msgpack.ExtType:
    header = _HEADERS[a.ndim]
    if a.dtype == np.bool_:
        return msgpack.ExtType(_EXT_ARRAY, header.pack(_BITS, a.ndim, *a.shape)
                               + np.packbits(a.reshape(-1), bitorder="little").tobytes())
    code = _DTYPE_CODES.get(a.dtype)
    if code is None:
        code = _DTYPE_CODES.get(a.dtype.newbyteorder("<"))  # a big-endian array is swapped
        if code is None:
            raise CodecError(f"cannot send a {a.dtype} array; only bool, int, uint and float arrays cross "
                             f"the handler-call service")
        a = a.astype(_WIRE_DTYPES[code])
    return msgpack.ExtType(_EXT_ARRAY, header.pack(code, a.ndim, *a.shape) + a.tobytes())


def _decode_array(data: bytes, depth: int) -> np.ndarray:
    if len(data) < 2 or data[0] >= len(_WIRE_DTYPES) or data[1] >= len(_HEADERS) \
            or len(data) < _HEADERS[data[1]].size:
        raise CodecError("malformed array header in a handler-call payload")
    code, ndim, *shape = _HEADERS[data[1]].unpack_from(data)
    at, count = 2 + 8 * ndim, math.prod(shape)
    dtype = _WIRE_DTYPES[code]
    need = (count + 7) // 8 if code == _BITS else count * dtype.itemsize
    if len(data) - at != need:
        raise CodecError(f"an array of shape {tuple(shape)} ({'bits' if code == _BITS else dtype}) needs {need} "
                         f"bytes; the payload has {len(data) - at}")
    if code == _BITS:
        bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=at), count=count, bitorder="little")
        return bits.view(np.bool_).reshape(shape)
    array = np.frombuffer(data, dtype, offset=at)
    return array if ndim == 1 else array.reshape(shape)


# the step types, field by field (nested payloads use the same extensions)

def _encode_forward(r: ForwardRequest) -> msgpack.ExtType:
    fields = [np.asarray(r.token_ids), np.asarray(r.position_ids), np.asarray(r.kv_page_indices),
              int(r.kv_last_page_len), np.asarray(r.output_indices), list(r.samplers),
              None if r.attention_mask is None else np.asarray(r.attention_mask, dtype=bool)]
    return msgpack.ExtType(_EXT_FORWARD, encode_value(fields))


def _decode_forward(data: bytes, depth: int) -> ForwardRequest:
    fields = _fields(data, depth, 7, "forward request")
    tokens, positions, pages, last_len, outputs, samplers, mask = fields
    _expect(all(isinstance(a, np.ndarray) for a in (tokens, positions, pages, outputs))
            and isinstance(last_len, int) and isinstance(samplers, list)
            and all(isinstance(s, Sampler) for s in samplers)
            and (mask is None or (isinstance(mask, np.ndarray) and mask.dtype == np.bool_)), "forward request")
    return ForwardRequest(tokens, positions, pages, last_len, outputs, tuple(samplers), mask)


def _encode_sampler(s: Sampler) -> msgpack.ExtType:
    fields = [s.kind, float(s.temperature), int(s.top_k), float(s.top_p), float(s.min_p),
              None if s.seed is None else int(s.seed), [int(t) for t in s.token_ids],
              None if s.allowed is None else np.asarray(s.allowed, dtype=bool), bool(s.with_logprob)]
    return msgpack.ExtType(_EXT_SAMPLER, encode_value(fields))


def _decode_sampler(data: bytes, depth: int) -> Sampler:
    kind, temperature, top_k, top_p, min_p, seed, token_ids, allowed, with_logprob = _fields(data, depth, 9,
                                                                                             "sampler")
    if kind not in Sampler.KINDS:
        raise CodecError(f"a sampler of kind {kind!r} arrived; the kinds are {', '.join(Sampler.KINDS)}")
    _expect(all(isinstance(x, float) for x in (temperature, top_p, min_p)) and isinstance(top_k, int)
            and (seed is None or isinstance(seed, int)) and isinstance(token_ids, list)
            and (allowed is None or (isinstance(allowed, np.ndarray) and allowed.dtype == np.bool_))
            and isinstance(with_logprob, bool), "sampler")
    return Sampler(kind, temperature, top_k, top_p, min_p, seed, tuple(token_ids), allowed, with_logprob)


def _encode_output(o: OutputResult) -> msgpack.ExtType:
    return msgpack.ExtType(_EXT_OUTPUT, encode_value([o.token, o.ids, o.probs, o.logprobs, o.logprob]))


def _decode_output(data: bytes, depth: int) -> OutputResult:
    token, ids, probs, logprobs, logprob = _fields(data, depth, 5, "output result")
    _expect((token is None or isinstance(token, int)) and (logprob is None or isinstance(logprob, float))
            and all(a is None or isinstance(a, np.ndarray) for a in (ids, probs, logprobs)), "output result")
    return OutputResult(token, ids, probs, logprobs, logprob)


def _fields(data: bytes, depth: int, count: int, what: str) -> list:
    fields = _decode(data, depth)
    if not isinstance(fields, list) or len(fields) != count:
        raise CodecError(f"a {what} in a handler-call payload must have {count} fields, got {_describe(fields)}")
    return fields


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise CodecError(f"a {what} in a handler-call payload has a field of the wrong type")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int):
        raise CodecError(f"the {what} of a handler-call message must be an int, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


_ENCODERS: dict[type, Callable[[Any], msgpack.ExtType]] = {
    np.ndarray: _encode_array, ForwardRequest: _encode_forward, Sampler: _encode_sampler,
    OutputResult: _encode_output,
}
_DECODERS: dict[int, Callable[[bytes, int], Any]] = {  # (payload, its depth in extensions)
    _EXT_ARRAY: _decode_array, _EXT_FORWARD: _decode_forward,
    _EXT_SAMPLER: _decode_sampler, _EXT_OUTPUT: _decode_output,
}


# -- error kinds ----------------------------------------------------------------------------------

def _error_classes(module: types.ModuleType) -> list[type[BaseException]]:
    return [c for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == module.__name__]


def _kinds(classes: list[type[BaseException]]) -> Mapping[str, type[BaseException]]:
    kinds = {}
    for cls in classes:
        if kinds.setdefault(cls.__name__, cls) is not cls:
            raise TypeError(f"two error classes are named {cls.__name__}: {cls} and {kinds[cls.__name__]}")
    return types.MappingProxyType(kinds)


# the errors a handler may raise, by class name: the runtime's and the directory's (cluster.errors),
# the inference layer's, the page registry's, this module's, and the builtins the imports answer with
ERROR_KINDS: Mapping[str, type[BaseException]] = _kinds(
    _error_classes(cluster.errors) + _error_classes(workers.errors)
    + [PageRefused, CodecError, RemoteError, ValueError, TimeoutError])
