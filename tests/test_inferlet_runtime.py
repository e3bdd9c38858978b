"""Inferlets built from Python by componentize-py and run in wasmtime against the real model.

One probe inferlet (tests/inferlets/api_probe.py) has a mode per part of the API and per kind
of misbehaviour; its results come back as JSON messages and are checked against the executor.
"""
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import BuildError, InvalidComponentError
from cluster.inferlet_build import build
from cluster.inferlet_host import InferletHost
from cluster.sandbox import Limits
from helpers import allocated, make_request, step_logprobs, full_logprobs

PROBE = Path(__file__).parent / "inferlets" / "api_probe.py"
EXAMPLE = Path(__file__).parent.parent / "inferlets" / "examples" / "text_completion.py"


@pytest.fixture(scope="module")
def runner(_executor_fp32):
    with InferletHost(_executor_fp32) as host:
        host.component(PROBE)  # build and compile once (cached by content hash afterwards)
        yield host
        host.services.pages.check_idle()


def settled(host) -> None:
    """Wait until the host's queued page operations and passes have run (they hold page pins)."""
    host.services.batcher.flush().wait(60)


def run_probe(runner, *args, limits=None):
    outcome = runner.run(PROBE, [str(a) for a in args], limits=limits)
    return outcome, [json.loads(m) for m in outcome.messages if m.startswith("{")]


def test_runtime_and_model_info(runner, ex32):
    outcome, [msg] = run_probe(runner, "runtime", "a", "b c")
    assert outcome.ok, outcome.error
    assert msg["args"] == ["runtime", "a", "b c"] and msg["instance_id"] == outcome.instance_id
    info = ex32.info
    assert (msg["vocab_size"], msg["page_size"], msg["max_position"], msg["stop_tokens"]) == (
        info.vocab_size, info.page_size, info.max_position, list(info.stop_token_ids))


def test_tokenizer_and_chat_template(runner, ex32):
    outcome, (msg, err) = run_probe(runner, "tokenizer")
    assert outcome.ok, outcome.error
    tok = ex32.tokenizer
    assert msg["ids"] == tok.encode("Hello, world!") and msg["text"] == "Hello, world!"
    assert msg["chat"] == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "outside the vocabulary" in err["decode_error"]


def test_generate_answers_and_frees_its_pages(runner, ex32):
    free = ex32.num_free_pages
    outcome, [msg] = run_probe(runner, "generate", "What is the capital of France?", 16)
    assert outcome.ok, outcome.error
    assert "Paris" in msg["text"]
    settled(runner)
    assert ex32.num_free_pages == free  # the Context freed its pages on exit


def test_samplers_match_the_executor(runner, ex32):
    banned = 7042  # " Paris": the greedy answer, which the logit mask forbids
    outcome, [msg] = run_probe(runner, "samplers", "The capital of France is", banned)
    assert outcome.ok, outcome.error
    tokens = msg["tokens"]
    with allocated(ex32, 1) as pages:
        [ref] = step_logprobs(ex32, [make_request(tokens, pages, ex32.info.page_size, outputs=[len(tokens) - 1],
                                                  samplers=[full_logprobs(ex32.info.vocab_size)])])
    ref = ref[0]
    assert msg["greedy"] == int(np.argmax(ref))
    assert msg["masked"] != banned and msg["masked"] == int(np.argsort(-ref)[1] if msg["greedy"] == banned
                                                             else np.argmax(ref))
    assert msg["dist_ids"] == np.argsort(-ref)[:5].tolist()
    np.testing.assert_allclose(msg["dist_probs"], np.exp(ref[msg["dist_ids"]]), rtol=1e-4)  # fp32 softmax
    np.testing.assert_allclose(msg["logprobs"], ref[[banned, 42]], atol=1e-4)
    assert msg["sampled"] in np.argsort(-ref)[:40].tolist()  # top_k=40


def test_kv_copy_mask_and_ownership(runner, ex32):
    free = ex32.num_free_pages
    outcome, [msg] = run_probe(runner, "kv")
    assert outcome.ok, outcome.error
    errors = msg["errors"]
    assert "not held" in errors["copy_foreign"] and "not held" in errors["free_foreign"]
    assert "not held" in errors["double_free"]
    settled(runner)
    assert ex32.num_free_pages == free  # the page it kept was reclaimed when it ended


def test_run_length_masks_and_queued_passes(runner, ex32):
    outcome, msgs = run_probe(runner, "masked_pass", "one two three four five six seven")
    assert outcome.ok, outcome.error
    msg = msgs[0]
    tokens, n = msg["tokens"], len(msg["tokens"])
    mask = np.tril(np.ones((n, n), dtype=bool))
    mask[1:, 0] = False  # what the run lengths say: every later token skips slot 0
    sampler = full_logprobs(ex32.info.vocab_size)
    with allocated(ex32, 1) as p1, allocated(ex32, 1) as p2:
        plain, masked = step_logprobs(ex32, [
            make_request(tokens, p1, ex32.info.page_size, outputs=[n - 1], samplers=[sampler]),
            make_request(tokens, p2, ex32.info.page_size, outputs=[n - 1], samplers=[sampler], mask=mask)])
    ids = [0, 1, 2, 100]
    np.testing.assert_allclose(msg["plain"], plain[0][ids], atol=1e-4)  # same fp32 step, another batch
    np.testing.assert_allclose(msg["masked"], masked[0][ids], atol=1e-4)
    assert not np.allclose(msg["plain"], msg["masked"], atol=1e-3)  # the mask mattered
    assert "no pass with handle" in msgs[1]["rewait_error"]
    assert "covers 1 slots" in msgs[2]["bad_mask_error"]


def test_guest_exception_reports_its_traceback(runner, ex32):
    outcome, _ = run_probe(runner, "raise")
    assert not outcome.ok
    assert "ValueError: the inferlet's own failure" in outcome.error
    assert "api_probe.py" in outcome.error and "in inner" in outcome.error


def _run_beside_a_good_one(runner, *bad_args, limits=None):
    """Run a misbehaving probe and a text completion at once; return (bad outcome, good outcome)."""
    bad = runner.launch(PROBE, [str(a) for a in bad_args], limits=limits)
    good = runner.launch(EXAMPLE, ["--max-tokens", "12"])
    return bad.wait(120), good.wait(120)


def test_infinite_loop_is_stopped_by_the_cpu_limit(runner, ex32):
    bad, good = _run_beside_a_good_one(runner, "spin", limits=Limits(fuel=2_000_000_000))
    assert "CPU" in bad.error
    assert good.ok and "Paris" in "".join(good.messages)


def test_infinite_loop_is_stopped_by_the_wall_clock_limit(runner, ex32):
    bad, good = _run_beside_a_good_one(runner, "spin", limits=Limits(wall_seconds=1.0))
    assert "wall-clock" in bad.error
    assert good.ok and "Paris" in "".join(good.messages)


def test_memory_bomb_hits_the_memory_limit(runner, ex32):
    bad, good = _run_beside_a_good_one(runner, "memory_bomb", limits=Limits(memory_bytes=96 << 20))
    assert "MemoryError" in bad.error
    assert good.ok and "Paris" in "".join(good.messages)


def test_no_filesystem(runner, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    for path in ("/etc/passwd", str(secret)):
        outcome, [msg] = run_probe(runner, "read_file", path)
        assert outcome.ok and "read" not in msg and "No such file" in msg["error"]


def test_no_network(runner):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        outcome, [msg] = run_probe(runner, "socket", server.getsockname()[1])
        assert "connected" not in msg and msg["error"]
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the listening socket
    finally:
        server.close()


def test_message_flood_is_limited(runner):
    outcome, msgs = run_probe(runner, "flood", 100_000, 50)
    assert outcome.ok
    assert "exceeds the limit" in msgs[0]["error"]
    assert outcome.messages[1:] == [str(i) for i in range(50)]


def test_page_hog_hits_its_quota_and_loses_everything(runner, ex32):
    free = ex32.num_free_pages
    bad, good = _run_beside_a_good_one(runner, "hog_pages", "keep", limits=Limits(max_pages=40))
    assert "quota of 40" in json.loads(bad.messages[0])["error"]
    assert "ending while holding 40 pages" in bad.error
    assert good.ok and "Paris" in "".join(good.messages)
    settled(runner)
    assert ex32.num_free_pages == free
    ex32.check_idle_invariant()


def test_many_inferlets_at_once(runner, ex32):
    free = ex32.num_free_pages
    running = [runner.launch(EXAMPLE, ["--max-tokens", "10"]) for _ in range(6)]
    outcomes = [r.wait(120) for r in running]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len({o.instance_id for o in outcomes}) == 6
    assert all("Paris" in "".join(o.messages) for o in outcomes)
    settled(runner)
    assert ex32.num_free_pages == free


def test_build_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "broken_inferlet.py"
    bad.write_text("def main(args):\n    x = (\n")
    with pytest.raises(BuildError) as e:
        build(bad)
    assert "broken_inferlet.py" in str(e.value) and "line 2" in str(e.value)


def test_bad_components_are_refused(runner, tmp_path):
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm not really")
    with pytest.raises(InvalidComponentError):
        runner.component(junk)
    with pytest.raises(InvalidComponentError):
        runner.component(tmp_path / "program.txt")


def test_second_build_is_a_cache_hit(runner):
    first = build(PROBE)
    assert build(PROBE) == first and first.stat().st_size > 1 << 20


def test_what_the_program_writes_to_stderr_reaches_the_client(runner):
    outcome = runner.run(EXAMPLE, ["--nope"])
    assert not outcome.ok
    assert "unrecognized arguments: --nope" in outcome.error and "SystemExit" in outcome.error
