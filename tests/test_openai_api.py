"""The OpenAI-compatible HTTP API with the real `openai` client, over loopback, on an embedded host
with the real model (fp32): each request runs the built-in inferlet, checked against the plain
decode loop on the same executor; streaming, n, logprobs, JSON schemas, stop strings, errors,
auth, a client that goes away, and the prefix cache across the turns of a conversation."""
from __future__ import annotations

import asyncio
import json
import math
import time

import jsonschema
import openai
import pytest
import requests

from cluster.api.grpc_client import PieClient
from cluster.api.grpc_server import InferletService, serve_service
from cluster.api.openai_http import MAX_BODY_BYTES, OpenAIFrontend, serve_openai
from cluster.api.program_store import ProgramStore
from cluster.runtime.inferlet_host import InferletHost, Outcome
from cluster.runtime.sandbox import Limits
from helpers import CHAT_QUESTION, settled
from workers.decode_loop import generate

MODEL = "SmolLM2-135M-Instruct.Q4_1"
TOKEN = "sk-test-token"
SYSTEM = "You are a terse geography tutor. Answer in one short sentence, and never more than that."


@pytest.fixture(scope="module")
def stack(_executor_fp32, tmp_path_factory):
    """(host, gRPC target, OpenAI base URL) of one embedded server; every page back at the end."""
    with InferletHost(_executor_fp32) as host:
        service = InferletService(host, ProgramStore(tmp_path_factory.mktemp("programs")))
        grpc_server = serve_service(service, port=0)
        http = serve_openai(service, port=0)
        try:
            yield host, grpc_server.target, http.url
        finally:
            http.stop()
            grpc_server.stop(0)
            settled(host)
            host.worker.pages.check_idle()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack[2], api_key="key-one", max_retries=0, timeout=180)


def plain_answer(executor, messages, max_tokens) -> str:
    """What the plain greedy loop answers, no inferlet and no cache in between."""
    tok = executor.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": r, "content": c} for r, c in messages]))
    [out] = generate(executor, [ids], max_tokens)
    if out and out[-1] in executor.info.stop_token_ids:
        out = out[:-1]
    return tok.decode(out)


def test_models_lists_the_served_model(client):
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "pie-cluster"


def test_chat_answer_is_the_plain_greedy_answer(client, _executor_fp32):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT_QUESTION}],
                                           max_tokens=24, temperature=0)
    [choice] = reply.choices
    assert choice.message.content == plain_answer(_executor_fp32, [("user", CHAT_QUESTION)], 24)
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.usage.prompt_tokens > 20 and 0 < reply.usage.completion_tokens < 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_stops_at_max_tokens(client, _executor_fp32):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    [choice] = reply.choices
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 8
    ids = _executor_fp32.tokenizer.encode("Once upon a time")
    [out] = generate(_executor_fp32, [ids], 8, stop_token_ids=())
    assert choice.text == _executor_fp32.tokenizer.decode(out)


def test_streamed_chat_is_the_same_answer_in_pieces(client):
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # it did stream
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_sampled_with_a_seed(client):
    ask = lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=12, n=3,
        temperature=1.0, top_p=0.95, seed=7)
    reply = ask()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1, texts  # each choice draws with its own seed
    assert 3 <= reply.usage.completion_tokens <= 3 * 12 and all(c.finish_reason for c in reply.choices)
    assert [c.message.content for c in ask().choices] == texts  # the same seed, the same choices


def test_chat_logprobs_are_the_models(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT_QUESTION}],
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        # greedy: the token is the most likely one, and its log-probability is the top one's
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob


def test_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0.8, seed=3,
                                      logprobs=2, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_json_schema_response_parses_and_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content)
    jsonschema.validate(answer, schema)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Any JSON, please."}],
                                           max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_stop_strings_end_the_text_before_them(client):
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                      stop=[" 7"], extra_body={"ignore_eos": True})
    text = reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop" and " 7" not in text and text.strip().startswith("5")


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"


def test_malformed_and_oversized_bodies(stack):
    url = stack[2]
    bad = requests.post(f"{url}/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    big = requests.post(f"{url}/completions", data=b" " * (MAX_BODY_BYTES + 1))
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    unknown = requests.get(f"{url}/engines")
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_a_token_guards_every_route(_executor_fp32, tmp_path):
    with InferletHost(_executor_fp32) as host:
        http = serve_openai(InferletService(host, ProgramStore(tmp_path)), port=0, token=TOKEN)
        try:
            wrong = openai.OpenAI(base_url=http.url, api_key="sk-wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            with pytest.raises(openai.AuthenticationError):
                wrong.completions.create(model=MODEL, prompt="hi", max_tokens=1)
            right = openai.OpenAI(base_url=http.url, api_key=TOKEN, max_retries=0)
            assert right.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens > 0
        finally:
            http.stop()


def test_a_client_that_goes_away_stops_its_inferlet_and_gives_pages_back(stack, client):
    host, target, _ = stack
    with PieClient(target) as grpc_client:
        before = grpc_client.health()
        stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        received = [next(iter(stream)) for _ in range(3)]
        assert all(c.choices[0].text is not None for c in received)
        assert grpc_client.health().running == 1
        stream.close()  # the client disconnects mid-stream
        deadline = time.monotonic() + 30
        while grpc_client.health().running and time.monotonic() < deadline:
            time.sleep(0.05)
        settled(host)
        after = grpc_client.health()
    assert after.running == 0
    assert after.free_pages == before.free_pages  # a prompt under one page: nothing of it is cached


def test_the_second_turn_reuses_the_first_turns_pages(client, stack, _executor_fp32):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CHAT_QUESTION}]
    one = client.chat.completions.create(model=MODEL, messages=first, max_tokens=24, temperature=0)
    assert one.usage.prompt_tokens > 32
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "And of Italy?"}]
    two = client.chat.completions.create(model=MODEL, messages=second, max_tokens=24, temperature=0)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < two.usage.prompt_tokens
    # the same conversation under another API key computes everything, and answers the same
    other = openai.OpenAI(base_url=stack[2], api_key="key-two", max_retries=0, timeout=180)
    fresh = other.chat.completions.create(model=MODEL, messages=second, max_tokens=24, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == two.choices[0].message.content
    assert two.choices[0].message.content == plain_answer(_executor_fp32, [(m["role"], m["content"]) for m in second], 24)


def test_probabilities_are_normalized(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say yes."}],
                                           max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
    total = sum(math.exp(t.logprob) for t in reply.choices[0].logprobs.content[0].top_logprobs)
    assert 0.3 < total <= 1.0 + 1e-4  # 20 of 49152 tokens: most of the mass, never more than all of it


def test_past_max_running_a_request_gets_429(_executor_fp32, tmp_path):
    with InferletHost(_executor_fp32) as host:
        http = serve_openai(InferletService(host, ProgramStore(tmp_path), max_running=1), port=0)
        try:
            api = openai.OpenAI(base_url=http.url, api_key="k", max_retries=0, timeout=180)
            busy = api.completions.create(model=MODEL, prompt="Once", max_tokens=300, stream=True,
                                          extra_body={"ignore_eos": True})
            next(iter(busy))  # the one slot is taken while it streams
            with pytest.raises(openai.RateLimitError) as caught:
                api.completions.create(model=MODEL, prompt="Twice", max_tokens=2)
            assert "limit" in caught.value.body["message"]
            busy.close()
        finally:
            http.stop()
        settled(host)


def test_a_stream_whose_client_stops_reading_suspends_its_inferlet_at_the_outbox_bound(_executor_fp32, tmp_path,
                                                                                         monkeypatch):
    """The OpenAI path bounds a request's unread events as the gRPC one does: while the HTTP side
    reads nothing, the inferlet's sends stop at the bound (they ran to the end into an unbounded
    queue before); once it reads again every event arrives."""
    bound = 4
    with InferletHost(_executor_fp32, limits=Limits(max_outbox_messages=bound)) as host:
        frontend = OpenAIFrontend(InferletService(host, ProgramStore(tmp_path)))
        puts, start = [], frontend.start

        def counting_start(job, authorization, sink):
            put = sink.put
            sink.put = lambda item: (puts.append(item), put(item))[1]
            return start(job, authorization, sink)
        monkeypatch.setattr(frontend, "start", counting_start)
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stream": True,
                "ignore_eos": True}
        job = frontend.job(json.dumps(body).encode(), chat=False)

        async def read_pause_read():
            events = frontend.events(job, None)
            first = await events.__anext__()
            last, deadline = -1, time.monotonic() + 60
            while len(puts) != last and time.monotonic() < deadline:  # until the puts stop
                last = len(puts)
                await asyncio.sleep(1.0)
            return first, last, [e async for e in events]

        first, stalled, rest = asyncio.run(read_pause_read())
        settled(host)
    assert stalled <= bound + 2, f"{stalled} events were put while nobody read (bound {bound})"
    assert isinstance(rest[-1], Outcome) and rest[-1].ok, rest[-1]
    assert len(puts) == len(rest) + 1 > 3 * bound  # every event arrived, far more than the bound
