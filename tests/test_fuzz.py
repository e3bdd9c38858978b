"""Property-based fuzzing (hypothesis) of what untrusted peers hand the server (issue 18): the
handler-call codec's msgpack frames, a forward pass's sizes, OpenAI request bodies (parsed, and
sent to the real HTTP server), and the client gRPC API fed random bytes and wrong types over
real gRPC. Property everywhere: a clean refusal or a value, never a crash or a hang, the server
still serving and every page back at the end. The guest-side fuzzing of every WIT import is
tests/test_inferlet_runtime.py::test_imports_called_with_random_arguments_answer_or_refuse.

The suite runs a bounded number of examples; `make fuzz` runs many more (HYPOTHESIS_PROFILE=fuzz)."""
from __future__ import annotations

import json
import os

import grpc
import msgpack
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.api.grpc_server import InferletService, serve
from cluster.api.openai_http import serve_openai
from cluster.api.openai_requests import ApiError, parse
from cluster.api.program_store import ProgramStore
from cluster.rpc.handler_codec import CodecError, decode_call, decode_reply, decode_value
from cluster.runtime.imports.forward import check_sizes, decode_mask
from cluster.runtime.inferlet_host import InferletHost
from cluster.runtime.sandbox import Limits
from cluster.runtime.wit_values import Refused, record

settings.register_profile("suite", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

EDGE_INTS = st.one_of(st.integers(0, 64), st.sampled_from([255, 4096, 65535, 2**31 - 1, 2**32 - 1, 2**63 - 1]),
                      st.integers(-2**63, 2**64 - 1))
JSONISH = st.recursive(st.none() | st.booleans() | EDGE_INTS | st.floats(allow_nan=True) | st.text(max_size=40),
                       lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                       max_leaves=30)
MSGPACKISH = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
                          | st.text(max_size=20) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=60)),
                          lambda inner: st.lists(inner, max_size=6), max_leaves=30)


# -- handler-call frames ---------------------------------------------------------------------------

@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_codec_error(data):
    for decode in (decode_call, decode_reply, decode_value):
        try:
            decode(data)
        except CodecError:
            pass


@given(st.lists(MSGPACKISH, min_size=0, max_size=6))
def test_structured_frames_decode_or_raise_codec_error(fields):
    data = msgpack.packb(fields, use_bin_type=True)
    for decode in (decode_call, decode_reply):
        try:
            decode(data)
        except CodecError:
            pass


# -- a forward pass's sizes ------------------------------------------------------------------------

def _pass(tokens, positions, pages, last, mask, outputs):
    return record(tokens=tokens, positions=positions, pages=pages, last_page_len=last, mask=mask,
                  outputs=[record(index=i, sampler=None) for i in range(outputs)])


LIMITS = Limits(max_pass_tokens=64, max_pass_pages=8, max_mask_cells=4096)


@given(st.lists(st.integers(0, 100), max_size=80), st.integers(0, 80), st.lists(st.integers(0, 50), max_size=12),
       st.sampled_from([0, 1, 7, 16, 17, 2**30, 2**32 - 1]), st.booleans(),
       st.lists(st.lists(st.sampled_from([0, 1, 3, 16, 2**30]), max_size=9), max_size=4), st.integers(0, 3))
def test_pass_sizes_are_refused_or_bound_the_mask(tokens, positions, pages, last, masked, rows, outputs):
    p = _pass(tokens, list(range(positions)), pages, last, rows if masked else None, outputs)
    try:
        kv_len = check_sizes(LIMITS, p, 16, 1000)
    except Refused:
        return
    assert 1 <= len(tokens) <= LIMITS.max_pass_tokens and 1 <= len(pages) <= LIMITS.max_pass_pages
    assert kv_len <= LIMITS.max_pass_pages * 16
    if masked:
        assert len(tokens) * kv_len <= LIMITS.max_mask_cells
        assert decode_mask(rows, len(tokens), kv_len).shape == (len(tokens), kv_len)


# -- OpenAI request bodies -------------------------------------------------------------------------

OPENAI_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
               "stop", "stream", "stream_options", "logprobs", "top_logprobs", "seed", "response_format",
               "ignore_eos", "presence_penalty", "user"]
BODIES = st.one_of(JSONISH, st.dictionaries(st.sampled_from(OPENAI_KEYS), JSONISH, max_size=8),
                   st.fixed_dictionaries({"model": st.just("m"), "messages": JSONISH},
                                         optional={k: JSONISH for k in OPENAI_KEYS[2:]}))


@given(BODIES, st.booleans())
def test_openai_bodies_parse_or_raise_api_error(body, chat):
    try:
        parse(body, chat, "m", 256)
    except ApiError as e:
        assert e.status in (400, 404) and str(e)


# -- the real servers, fed garbage -----------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(_executor_fp32):
    with InferletHost(_executor_fp32) as host:
        grpc_server = serve(host, port=0)
        http = serve_openai(InferletService(host, ProgramStore()), port=0)
        yield grpc_server, http
        http.stop()
        grpc_server.stop()
        assert grpc_server.service.List(None, None).inferlets == []


METHODS = ["Upload", "Launch", "Send", "Terminate", "List", "Health"]
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@given(st.sampled_from(METHODS), st.binary(max_size=300))
def test_the_grpc_api_answers_random_bytes_with_a_status(servers, method, data):
    """Random request bytes to every method (undecodable protobuf, or valid fields with nonsense):
    an answer or a clean status, and the server keeps answering."""
    grpc_server, _ = servers
    with grpc.insecure_channel(grpc_server.target) as channel:
        path = f"/pie.v1.Inferlets/{method}"
        try:
            if method == "Upload":
                channel.stream_unary(path)(iter([data, data]), timeout=30)
            elif method == "Launch":
                list(channel.unary_stream(path)(data, timeout=30))
            else:
                channel.unary_unary(path)(data, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in CLEAN, (e.code(), e.details())
        health = channel.unary_unary("/pie.v1.Inferlets/Health")(b"", timeout=30)
        assert health is not None


@given(st.one_of(BODIES.map(json.dumps), st.binary(max_size=200)), st.sampled_from(["/v1/chat/completions",
                                                                                     "/v1/completions"]))
def test_the_openai_api_answers_garbage_with_a_client_error(servers, body, path):
    _, http = servers
    reply = requests.post(http.url.removesuffix("/v1") + path, data=body, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code in (200, 400, 404, 413, 422), (reply.status_code, reply.text[:200])
    assert "error" in reply.json() or reply.status_code == 200
