"""The examples grouped in folders under inferlets/examples/ (reasoning/, kv/), each run briefly on
an InferletHost over the real model (fp32), with what each one promises checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.runtime.inferlet_host import InferletHost
from helpers import settled

EXAMPLES = Path(__file__).resolve().parent.parent / "inferlets" / "examples"


@pytest.fixture(scope="module")
def host(_executor_fp32):
    with InferletHost(_executor_fp32) as host:
        yield host
        settled(host)
        host.worker.pages.check_idle()


def run(host, example: str, *args: str) -> list[dict]:
    outcome = host.run(EXAMPLES / example, list(args))
    assert outcome.ok, outcome.error
    return [json.loads(m) for m in outcome.messages]


def test_best_of_n_keeps_the_answer_the_model_finds_most_likely(host):
    answers = run(host, "reasoning/best_of_n.py", "--n", "3", "--max-tokens", "10")
    assert len(answers) == 3 and sum(a["best"] for a in answers) == 1
    best = next(a for a in answers if a["best"])
    assert best["mean_logprob"] == max(a["mean_logprob"] for a in answers)
    assert all(a["mean_logprob"] <= 0 and a["answer"] for a in answers)


def test_self_consistency_returns_the_most_common_answer(host):
    [result] = run(host, "reasoning/self_consistency.py", "--samples", "4", "--max-tokens", "8")
    assert len(result["answers"]) == 4 and result["answer"] in result["answers"]
    assert 1 <= result["votes"] <= 4


def test_attention_sink_bounds_the_kv_cache(host):
    [result] = run(host, "kv/attention_sink.py", "--max-tokens", "96", "--window", "32")
    assert result["pages_dropped"] >= 3  # 96 tokens through a 32-token window: pages went back
    prompt_pages = 3  # the chat prompt's 37 tokens: 2 whole pages, then the page being written
    assert result["most_pages"] <= prompt_pages + 32 // 16 + 2
    assert result["positions"] > 96  # positions kept counting past the dropped pages


def test_codeact_runs_the_models_code_in_its_own_sandbox(host):
    events = run(host, "agents/codeact.py", "--rounds", "2", "--max-tokens", "24")
    rounds = [e for e in events if "round" in e]
    assert rounds and events[-1].keys() == {"answer"}
    assert all(e["observation"] for e in rounds)  # output, or the error the code raised: never a crash


def test_a_swarm_hears_every_other_agent(host):
    names = ["a", "b", "c"]
    running = [host.launch(EXAMPLES / "agents/swarm.py", ["--topic", "swarm-test", "--size", "3", "--name", n,
                                                           "--max-tokens", "8"]) for n in names]
    results = []
    for r in running:
        outcome = r.wait(300)
        assert outcome.ok, outcome.error
        results.append(json.loads(outcome.messages[-1]))
    for result in results:
        assert sorted(result["heard"]) == sorted(set(names) - {result["name"]})


def test_skeleton_of_thought_expands_every_point(host):
    [result] = run(host, "reasoning/skeleton_of_thought.py", "--points", "3", "--max-tokens", "8")
    assert len(result["outline"]) == len(result["expansions"]) == 3


def test_validate_retry_returns_valid_json_or_every_reason(host):
    [result] = run(host, "decoding/validate_retry.py", "--attempts", "3", "--max-tokens", "24")
    assert 1 <= result["attempts"] <= 3
    if result["value"] is None:
        assert len(result["failures"]) == 3 and all(f["why"] for f in result["failures"])
    else:
        assert {"name", "country"} <= set(result["value"]) and len(result["failures"]) == result["attempts"] - 1


def test_tree_of_thought_keeps_the_best_path(host):
    [result] = run(host, "reasoning/tree_of_thought.py", "--depth", "2", "--children", "2", "--beam", "2",
                   "--tokens", "6")
    assert len(result["path"]) == 2 and result["explored"] == 2 + 2 * 2 and result["score"] <= 0


def test_graph_of_thought_merges_its_thoughts(host):
    [result] = run(host, "reasoning/graph_of_thought.py", "--thoughts", "3", "--max-tokens", "8")
    assert len(result["thoughts"]) == 3 and result["answer"]


def test_recursion_of_thought_answers_sub_questions_first(host):
    [result] = run(host, "reasoning/recursion_of_thought.py", "--depth", "2", "--max-tokens", "8")
    assert [t["depth"] for t in result["trace"]] == [0, 1, 2]  # the deepest sub-question answered first


def test_watermarked_text_is_green_and_detected(host):
    [marked] = run(host, "decoding/watermark.py", "--key", "7", "--max-tokens", "24")
    assert marked["green_fraction"] == 1.0 and len(marked["tokens"]) > 5
    [plain] = run(host, "decoding/watermark.py", "--detect", "The sea is wide and deep, and its waves roll on "
                                                              "the shore all day long under the sun.", "--key", "7")
    assert plain["green_fraction"] < 0.8  # about half of an unmarked text's tokens are green


def test_windowed_attention_masks_what_leaves_the_window(host):
    [result] = run(host, "kv/windowed_attention.py", "--window", "8", "--max-tokens", "32")
    assert result["masked_slots"] >= 32 - 8 - 1 and result["text"]


def test_a_prefix_tree_computes_each_prefix_once(host):
    [result] = run(host, "kv/prefix_tree.py", "--max-tokens", "6")
    assert len(result["answers"]) == 4
    assert result["prompt_tokens_computed"] < 0.6 * result["prompt_tokens_one_by_one"]


def test_speculative_decoding_matches_greedy(host):
    prompt = "Write the word 'hello' ten times."  # greedy: "Hello, hello, ..." with no stop for 40 tokens
    [fast] = run(host, "decoding/speculative.py", "--prompt", prompt, "--max-tokens", "24")
    greedy = host.run(EXAMPLES / "text_completion.py", ["--prompt", prompt, "--max-tokens", "24"])
    assert "".join(greedy.messages) == fast["text"]
    # each round yields its accepted guesses and one token more; the repeated word is guessed right
    assert fast["rounds"] + fast["accepted_drafts"] == 24 and fast["accepted_drafts"] >= 8, fast


def test_jacobi_decoding_matches_greedy(host):
    [fast] = run(host, "decoding/jacobi.py", "--max-tokens", "24", "--window", "4")
    greedy = host.run(EXAMPLES / "text_completion.py", ["--prompt", "Count from one to twenty.", "--max-tokens", "24"])
    assert "".join(greedy.messages) == fast["text"]
    assert fast["rounds"] <= fast["tokens"] and fast["accepted_guesses"] == fast["tokens"] - fast["rounds"] + \
        (fast["tokens"] < 24)  # every pass yields its accepted guesses and one token of its own


def hierarchical(host, first: str, *flags: str) -> list[dict]:
    return run(host, "kv/hierarchical_attention.py", "--section", first, "--section", "Rome is the capital of Italy.",
               "--max-tokens", "6", *flags)


def test_hierarchical_attention_encodes_each_section_alone(host):
    cat, dog = hierarchical(host, "The cat sat on the mat."), hierarchical(host, "The dog sat on the mat.")
    assert cat[0]["tokens"] == dog[0]["tokens"]  # same positions for the second section in both documents
    assert cat[0]["next"] != dog[0]["next"] or cat[0]["probs"] != pytest.approx(dog[0]["probs"], abs=1e-3)
    # the second section saw the header and itself only: the first section's words change nothing
    assert cat[1]["next"] == dog[1]["next"] and cat[1]["probs"] == pytest.approx(dog[1]["probs"], abs=1e-4)
    assert cat[-1]["answer"] and cat[-1]["kv_len"] > sum(p["tokens"] for p in cat[:2])
    causal_cat, causal_dog = (hierarchical(host, first, "--causal") for first in ("The cat sat on the mat.",
                                                                                  "The dog sat on the mat."))
    assert causal_cat[1]["probs"] != pytest.approx(causal_dog[1]["probs"], abs=1e-4)  # without the mask it does
