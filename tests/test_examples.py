"""Example inferlets on an InferletHost over the real model (fp32), checked against plain greedy
decoding on the same executor (workers.decode_loop), with no inferlet and no cache in between."""
from pathlib import Path

import pytest

from cluster.runtime.inferlet_host import InferletHost
from helpers import settled
from workers.decode_loop import generate

EXAMPLES = Path(__file__).parent.parent / "inferlets" / "examples"
PREFIX_CACHE = EXAMPLES / "prefix_cache.py"
SYSTEM = "You are a terse geography tutor. Answer in one sentence."
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def host(_executor_fp32):
    with InferletHost(_executor_fp32) as host:
        yield host
        host.worker.pages.check_idle()


def chat_ids(executor, messages, add_generation_prompt=True) -> list[int]:
    tok = executor.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                              add_generation_prompt))


def greedy_answer(executor, messages) -> str:
    """The answer the plain loop gives for the whole conversation computed in one prefill."""
    [ids] = generate(executor, [chat_ids(executor, messages)], MAX_TOKENS)
    if ids and ids[-1] in executor.info.stop_token_ids:
        ids = ids[:-1]
    return executor.tokenizer.decode(ids)


def ask(host, question):
    """Launch prefix_cache with SYSTEM and `question`; its RunningInferlet."""
    return host.launch(PREFIX_CACHE, ["--system", SYSTEM, "--question", question, "--max-tokens", str(MAX_TOKENS)])


def status_and_answer(running) -> tuple[str, str]:
    outcome = running.wait(120)
    assert outcome.ok, outcome.error
    return outcome.messages[0], "".join(outcome.messages[1:])


def run_alone(host, question) -> tuple[str, str, int]:
    """Run prefix_cache with nothing beside it: (status, answer, input tokens the executor computed)."""
    settled(host)
    host.worker.batcher.steps.clear()
    status, answer = status_and_answer(ask(host, question))
    settled(host)
    return status, answer, sum(s.num_tokens for s in host.worker.batcher.steps)


def test_prefix_cache_misses_once_then_every_run_hits(host, ex32):
    free = ex32.num_free_pages
    question = "What is the capital of France?"
    miss, miss_answer, miss_tokens = run_alone(host, question)
    hit, hit_answer, hit_tokens = run_alone(host, question)
    assert (miss, hit) == ("cache miss", "cache hit")
    expected = greedy_answer(ex32, [("system", SYSTEM), ("user", question)])
    assert "Paris" in expected
    assert miss_answer == hit_answer == expected
    # the hit computed everything but the system prompt, which it imported
    system_len = len(chat_ids(ex32, [("system", SYSTEM)], add_generation_prompt=False))
    assert miss_tokens - hit_tokens == system_len

    questions = ["What is the capital of Italy?", "What is the capital of Japan?", "Which river flows through Cairo?"]
    running = [ask(host, q) for q in questions]  # at once, all importing the same pages
    for question, r in zip(questions, running):
        status, answer = status_and_answer(r)
        assert status == "cache hit"
        assert answer == greedy_answer(ex32, [("system", SYSTEM), ("user", question)])

    [name] = host.worker.pages.list_exports("prefix-cache/")  # it outlived every inferlet that used it
    settled(host)
    assert ex32.num_free_pages == free - -(-system_len // ex32.info.page_size)  # the system prompt's pages
    cleanup = host.run(PREFIX_CACHE, ["--system", SYSTEM, "--unexport"])
    assert cleanup.ok, cleanup.error
    assert cleanup.messages == [f"unexported {name}"] and host.worker.pages.list_exports() == []
    settled(host)
    assert ex32.num_free_pages == free


def test_prefix_cache_unexport_of_nothing_fails_cleanly(host, ex32):
    outcome = host.run(PREFIX_CACHE, ["--system", "never cached", "--unexport"])
    assert not outcome.ok and "nothing is exported" in outcome.error


def test_parallel_drafts_compute_the_prompt_once(host, ex32):
    drafts, max_tokens = 3, 8
    settled(host)
    host.worker.batcher.steps.clear()
    outcome = host.run(EXAMPLES / "parallel_drafts.py", ["--prompt", "Write a haiku about the sea.",
                                                          "--drafts", str(drafts), "--max-tokens", str(max_tokens)])
    assert outcome.ok, outcome.error
    settled(host)
    assert [m.splitlines()[0] for m in outcome.messages] == [f"--- draft {i}" for i in range(1, drafts + 1)]
    assert len(set(outcome.messages)) > 1  # differently seeded samples differ
    prompt_len = len(chat_ids(ex32, [("user", "Write a haiku about the sea.")]))
    step_tokens = sorted((s.num_tokens for s in host.worker.batcher.steps), reverse=True)
    # one pass writes the prompt but its last token; after that each draft computes a token per round
    assert step_tokens[0] == prompt_len - 1 and all(n <= drafts for n in step_tokens[1:])
    assert drafts <= sum(step_tokens[1:]) <= drafts * max_tokens
