"""handler_codec: every step type and envelope survives encode -> decode exactly (values, dtypes,
shapes), errors come back as their own class, and malformed or unsupported payloads are refused."""
import dataclasses

import msgpack
import numpy as np
import pytest

from cluster.rpc import handler_codec as codec
from cluster.rpc.handler_codec import (ERROR_KINDS, Call, CodecError, RemoteError, Reply, decode_call, decode_reply,
                                   decode_value, encode_call, encode_reply, encode_value)
from cluster.errors import ExportNameTaken
from cluster.worker.page_registry import PageRefused
from workers import ForwardRequest, InvalidRequestError, OutputResult, Sampler

VOCAB = 49157  # not a multiple of 8: the packed logit mask has a partial last byte


def assert_same(sent, got, path="value"):
    """Equal values, and arrays equal in dtype (little-endian) and shape, recursively."""
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert got.dtype == sent.dtype.newbyteorder("<") and got.shape == sent.shape, path
        assert np.array_equal(got, sent), path
    elif dataclasses.is_dataclass(sent):
        assert type(got) is type(sent), path
        for f in dataclasses.fields(sent):
            assert_same(getattr(sent, f.name), getattr(got, f.name), f"{path}.{f.name}")
    elif isinstance(sent, (list, tuple)):
        assert type(got) is type(sent) and len(got) == len(sent), path
        for i, (a, b) in enumerate(zip(sent, got)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert type(got) is type(sent) and got == sent, path


def round_trip(value):
    return decode_value(encode_value(value))


def request(samplers=(Sampler(),), mask=None, q_len=3):
    return ForwardRequest(np.arange(100, 100 + q_len), np.arange(q_len), np.array([5, 9]), 3,
                          np.array([q_len - 1] * len(samplers)), tuple(samplers), mask)


# -- step types ----------------------------------------------------------------------------------

ALL_SAMPLERS = [
    Sampler(),
    Sampler("greedy", allowed=np.arange(VOCAB) % 3 == 0),
    Sampler("sample", temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, seed=12345),
    Sampler("sample", temperature=0.9, with_logprob=True),
    Sampler("greedy", with_logprob=True),
    Sampler("sample", temperature=1.3),  # no seed: the executor's own generator
    Sampler("sample", temperature=0.5, seed=2**63 - 1, allowed=np.ones(VOCAB, bool)),
    Sampler("distribution", temperature=1.0, top_k=20),
    Sampler("distribution", temperature=0.8, top_k=5, allowed=np.zeros(VOCAB, bool)),
    Sampler("logprobs", token_ids=(3, 1, 4, 1, 5)),
    Sampler("logprobs", token_ids=tuple(range(VOCAB)), allowed=np.arange(VOCAB) < 7),
]


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda s: f"{s.kind}{'+mask' if s.allowed is not None else ''}"
                         f"{'+logprob' if s.with_logprob else ''}")
def test_every_sampler_kind_round_trips(sampler):
    assert_same(sampler, round_trip(sampler))
    assert_same(request([sampler, sampler]), round_trip(request([sampler, sampler])))


def test_logit_mask_is_sent_as_bits():
    mask = np.arange(VOCAB) % 2 == 0
    plain = len(encode_value(Sampler("greedy")))
    assert len(encode_value(Sampler("greedy", allowed=mask))) - plain < VOCAB // 8 + 32


def test_custom_attention_masks_round_trip():
    rng = np.random.default_rng(1)
    for q_len, kv_len in [(1, 1), (3, 35), (7, 9), (16, 64)]:
        mask = rng.random((q_len, kv_len)) < 0.5
        sent = request(mask=mask, q_len=q_len)
        got = round_trip(sent)
        assert_same(sent, got)
        assert got.attention_mask.shape == (q_len, kv_len)


def test_empty_outputs_and_results_round_trip():
    no_outputs = ForwardRequest(np.array([7, 8]), np.array([0, 1]), np.array([2]), 2)  # a plain prefill
    assert_same(no_outputs, round_trip(no_outputs))
    assert round_trip(no_outputs).output_indices.shape == (0,)
    for result in [OutputResult(), OutputResult(token=0), OutputResult(token=49151),
                   OutputResult(token=7, logprob=-1.25),
                   OutputResult(ids=np.array([5, 2, 9]), probs=np.array([0.5, 0.25, 0.125], np.float32)),
                   OutputResult(ids=np.zeros(0, np.int64), probs=np.zeros(0, np.float32)),
                   OutputResult(logprobs=np.array([-0.1, -2.5, -np.inf], np.float32))]:
        assert_same(result, round_trip(result))
    assert_same([], decode_reply(encode_reply(Reply(1, []))).result())


def test_arrays_keep_dtype_and_shape_and_numbers_arrive_read_only():
    for array in [np.arange(5, dtype=np.int32), np.arange(5, dtype=np.uint8), np.arange(6, dtype=np.float16),
                  np.linspace(0, 1, 7), np.array(3), np.zeros((2, 0, 3)), np.arange(24).reshape(2, 3, 4),
                  np.arange(4, dtype=">i4"),  # big-endian: arrives little-endian, same values
                  np.arange(12)[::3],  # not contiguous
                  np.array([[True, False, True]] * 3)]:
        got = round_trip(array)
        assert_same(array, got)
        assert got.flags.writeable == (array.dtype == np.bool_)  # numbers are views of the message


def test_random_requests_round_trip():
    """Property-style: many random requests, every field's value, dtype and shape preserved."""
    rng = np.random.default_rng(2024)
    kinds = Sampler.KINDS
    for _ in range(300):
        q_len = int(rng.integers(0, 40))
        num_pages = int(rng.integers(1, 9))
        dtype = rng.choice([np.int32, np.int64])
        outputs = rng.choice(max(q_len, 1), size=int(rng.integers(0, min(q_len, 4) + 1)), replace=False)
        samplers = []
        for _ in outputs:
            kind = str(rng.choice(kinds))
            allowed = rng.random(int(rng.integers(1, 300))) < 0.5 if rng.random() < 0.3 else None
            samplers.append(Sampler(kind, temperature=float(rng.uniform(0.1, 2)), top_k=int(rng.integers(0, 100)),
                                    top_p=float(rng.uniform(0, 1)), min_p=float(rng.uniform(0, 0.2)),
                                    seed=None if rng.random() < 0.5 else int(rng.integers(0, 2**62)),
                                    token_ids=tuple(int(t) for t in rng.integers(0, 50000, int(rng.integers(0, 6)))),
                                    allowed=allowed))
        kv_len = (num_pages - 1) * 16 + int(rng.integers(1, 17))
        mask = rng.random((q_len, kv_len)) < 0.7 if rng.random() < 0.3 else None
        sent = ForwardRequest(rng.integers(0, 50000, q_len).astype(dtype), rng.integers(0, 4096, q_len).astype(dtype),
                              rng.integers(0, 96, num_pages).astype(dtype), int(rng.integers(1, 17)),
                              outputs.astype(np.int64), tuple(samplers), mask)
        call = Call(int(rng.integers(0, 2**31)), "forward", f"inferlet-{rng.integers(1000)}", (sent,))
        got = decode_call(encode_call(call))
        assert_same(call, got)


# -- envelopes -----------------------------------------------------------------------------------

def test_call_envelope_round_trips_mixed_arguments():
    call = Call(42, "copy", "inferlet-7", (3, 4, 0, 5, 11, None, "name", b"\x00raw", [1, 2, 3], {"k": [1.5, True]},
                                           np.int64(9), np.float32(0.5)))
    got = decode_call(encode_call(call))
    assert (got.call_id, got.method, got.holder) == (42, "copy", "inferlet-7")
    assert got.args == (3, 4, 0, 5, 11, None, "name", b"\x00raw", [1, 2, 3], {"k": [1.5, True]}, 9, 0.5)
    assert decode_call(encode_call(Call(1, "list-exports", "i", ()))).args == ()


def test_reply_values_and_errors_come_back_as_their_own_class():
    results = [OutputResult(token=5), OutputResult(ids=np.array([1, 2]), probs=np.array([0.6, 0.4], np.float32))]
    got = decode_reply(encode_reply(Reply(9, results)))
    assert got.ok and got.call_id == 9
    assert_same(results, got.result())
    for error in [PageRefused("page 3 is not held by this inferlet"), ExportNameTaken("the name 'x' is taken"),
                  InvalidRequestError("position out of range", request_index=2), ValueError("bad argument"),
                  TimeoutError("no answer in 5 s")]:
        reply = decode_reply(encode_reply(Reply.failure(11, error)))
        assert not reply.ok and reply.call_id == 11 and reply.value is None
        with pytest.raises(type(error)) as raised:
            reply.result()
        assert type(raised.value) is type(error) and str(raised.value) == str(error)


def test_an_unknown_error_kind_raises_remote_error_naming_it():
    class FancyError(Exception):
        pass

    reply = decode_reply(encode_reply(Reply.failure(3, FancyError("it broke"))))
    with pytest.raises(RemoteError, match="FancyError: it broke") as raised:
        reply.result()
    assert raised.value.kind == "FancyError"
    with pytest.raises(FancyError):  # a caller may add its own kinds
        reply.result({**ERROR_KINDS, "FancyError": FancyError})


def test_error_kinds_cover_every_layer():
    for name in ["InferletError", "PageRefused", "WorkerError", "OutOfPagesError", "InvalidRequestError",
                 "DirectoryError", "UnknownExport", "NoLiveWorker", "CodecError", "ValueError"]:
        assert name in ERROR_KINDS


# -- refusals ------------------------------------------------------------------------------------

def test_unsupported_values_are_refused_when_encoding():
    for value in [object(), {1, 2}, np.array([1 + 2j]), np.array(["a", "b"]), np.array([object()]), 2**70]:
        with pytest.raises(CodecError):
            encode_value(value)


def test_malformed_payloads_are_refused_when_decoding():
    call = encode_call(Call(1, "forward", "i", (request(),)))
    reply = encode_reply(Reply(1, 5))
    with pytest.raises(CodecError, match="expected a handler call"):
        decode_call(reply)
    with pytest.raises(CodecError, match="expected a handler reply"):
        decode_reply(call)
    with pytest.raises(CodecError, match="malformed"):
        decode_call(call[:-3])  # truncated
    with pytest.raises(CodecError, match="malformed"):
        decode_value(b"\xc1")  # a byte msgpack never uses
    with pytest.raises(CodecError, match="unknown extension type 99"):
        decode_value(msgpack.packb(msgpack.ExtType(99, b"")))
    good = codec._encode_array(np.arange(4)).data
    with pytest.raises(CodecError, match="needs 32 bytes; the payload has 31"):
        decode_value(msgpack.packb(msgpack.ExtType(codec._EXT_ARRAY, good[:-1])))
    with pytest.raises(CodecError, match="malformed array header"):
        decode_value(msgpack.packb(msgpack.ExtType(codec._EXT_ARRAY, bytes([200, 1]) + good[2:])))
    bad_kind = msgpack.packb(["beam", 1.0, 0, 1.0, 0.0, None, [], None, False])
    with pytest.raises(CodecError, match="kind 'beam'"):
        decode_value(msgpack.packb(msgpack.ExtType(codec._EXT_SAMPLER, bad_kind)))
    short = msgpack.packb([1, 2])
    with pytest.raises(CodecError, match="must have 7 fields"):
        decode_value(msgpack.packb(msgpack.ExtType(codec._EXT_FORWARD, short)))
    nested = b""
    for _ in range(5000):  # output results nested in output results: refused, not a stack overflow
        nested = msgpack.packb(msgpack.ExtType(codec._EXT_OUTPUT, nested))
    with pytest.raises(CodecError, match="nests extensions more than 4 deep"):
        decode_value(nested)
    wrong_type = msgpack.packb(["greedy", "hot", 0, 1.0, 0.0, None, [], None, False])
    with pytest.raises(CodecError, match="wrong type"):
        decode_value(msgpack.packb(msgpack.ExtType(codec._EXT_SAMPLER, wrong_type)))


def test_micro_benchmark_prints_its_numbers(capsys):
    from cluster.bench import codec as codec_bench

    codec_bench.main(repeats=3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("encode+decode" in line and line.endswith(" us") for line in lines)
