"""The vLLM executor against the torch executor (fp32, the reference): ragged mixed steps over shared and
non-contiguous pages, chunked prefill, custom masks and masked slots, and KV pages moved between the two.
Runs where vLLM is installed (`make test-vllm`); the contract tests run on it through PIE_TEST_EXECUTORS."""
import numpy as np
import pytest

from helpers import allocated, logprobs_request, max_abs_diff, step_logprobs

pytest.importorskip("vllm", reason="the vLLM executor needs .venv-vllm (make setup-vllm; make test-vllm)")
pytestmark = pytest.mark.vllm

# tolerance on full-vocabulary log-probabilities, vLLM vs torch in fp32: different matmul and attention
# kernels round differently (measured <= 2e-4 here); a wrong mask or page moves them by > 0.1
TOL = 2e-3


@pytest.fixture(scope="module")
def pair(smollm2):
    """(vLLM executor, torch executor), fp32, 16-slot pages, over the session's SmolLM2 load."""
    from workers.torch_executor import TorchExecutor
    from workers.vllm_exec.executor import VllmExecutor

    vx = VllmExecutor.from_loaded(smollm2, dtype="fp32", page_size=16, num_pages=32)
    tx = TorchExecutor(smollm2, dtype="fp32", page_size=16, num_pages=32)
    yield vx, tx
    for ex in (vx, tx):
        ex.check_idle_invariant()
        assert ex.num_free_pages == 32


def scenario(ex, ids) -> list[np.ndarray]:
    """Two steps; the second mixes every kind of request the executor serves. Its log-probs, in order."""
    with allocated(ex, 12) as p:
        a_pages, b_pages, g_pages = [p[7], p[2]], [p[3], p[9], p[0]], [p[6]]
        first = step_logprobs(ex, [
            logprobs_request(ex, ids[:21], a_pages, outputs=[20]),  # A: 21 tokens over pages out of order
            logprobs_request(ex, ids, b_pages),  # B: the whole prompt, every position
            logprobs_request(ex, ids[:10], g_pages, outputs=[9]),  # G: 10 tokens
        ])
        ex.mask_slots(p[3], [i in (2, 3, 4, 5) for i in range(16)])  # hide 4 of B's slots from now on
        n = len(ids)
        hide = np.tril(np.ones((n, n), dtype=bool))
        hide[12:, 5:11] = False  # D: tokens from 12 on do not see tokens 5..10
        second = step_logprobs(ex, [
            logprobs_request(ex, ids[21:30], a_pages, start=21),  # A: a chunk over its history (torch path: no)
            logprobs_request(ex, [ids[5]], b_pages, start=n),  # B: a decode that must skip masked slots
            logprobs_request(ex, [ids[10]], g_pages, start=10),  # G: a plain decode (vLLM's kernel)
            # C: shares A's full first page, continues with other tokens on a page of its own
            logprobs_request(ex, ids[27:31], [p[7], p[5]], start=16),
            logprobs_request(ex, ids, [p[10], p[4], p[11]], outputs=range(10, n), mask=hide),  # D
        ])
        ex.mask_slots(p[3], [False] * 16)
    return first + second


def test_mixed_steps_equal_the_torch_executor(pair, chat_ids):
    vx, tx = pair
    got, want = scenario(vx, chat_ids), scenario(tx, chat_ids)
    assert [g.shape for g in got] == [w.shape for w in want]
    for i, (g, w) in enumerate(zip(got, want)):
        assert max_abs_diff(g, w) < TOL, f"request {i}: {max_abs_diff(g, w)}"


def test_masks_and_masked_slots_change_the_answer(pair, chat_ids):
    """The masked requests of the scenario differ from their unmasked selves: masks are served, not dropped."""
    vx, _ = pair
    masked = scenario(vx, chat_ids)
    n = len(chat_ids)
    with allocated(vx, 3) as p:
        plain = step_logprobs(vx, [logprobs_request(vx, chat_ids, p, outputs=range(10, n))])[0]
    assert max_abs_diff(masked[7], plain) > 0.1  # D with its custom mask vs without
    with allocated(vx, 3) as p:
        step_logprobs(vx, [logprobs_request(vx, chat_ids, p, outputs=[])])
        unmasked_decode = step_logprobs(vx, [logprobs_request(vx, [chat_ids[5]], p, start=n)])[0]
    assert max_abs_diff(masked[4], unmasked_decode) > 0.1  # B's decode with 4 slots hidden vs none


@pytest.mark.parametrize("direction", ["vllm->torch", "torch->vllm"])
def test_pages_move_between_executors(pair, chat_ids, direction):
    """read_pages on one executor, write_pages on the other: a decode there gives what it gives at home."""
    vx, tx = pair
    src, dst = (vx, tx) if direction == "vllm->torch" else (tx, vx)
    n = len(chat_ids)
    with allocated(src, 3) as sp, allocated(dst, 3) as dp:
        step_logprobs(src, [logprobs_request(src, chat_ids, sp, outputs=[])])
        src.mask_slots(sp[1], [i == 7 for i in range(16)])  # a masked slot travels too
        at_home = step_logprobs(src, [logprobs_request(src, [chat_ids[3]], sp, start=n)])[0]
        dst.write_pages(dp, src.read_pages(sp))
        moved = step_logprobs(dst, [logprobs_request(dst, [chat_ids[3]], dp, start=n)])[0]
        src.mask_slots(sp[1], [False] * 16)
        dst.mask_slots(dp[1], [False] * 16)
    assert max_abs_diff(moved, at_home) < TOL


def test_copy_slots_on_vllm_pages(pair, chat_ids):
    """A prefix copied slot by slot into fresh pages decodes like the original."""
    vx, _ = pair
    n = len(chat_ids)
    with allocated(vx, 6) as p:
        step_logprobs(vx, [logprobs_request(vx, chat_ids, p[:3], outputs=[])])
        for src, dst in zip(p[:3], p[3:]):
            vx.copy_slots(src, dst, 0, 0, 16)
        a = step_logprobs(vx, [logprobs_request(vx, [chat_ids[1]], p[:3], start=n)])[0]
        b = step_logprobs(vx, [logprobs_request(vx, [chat_ids[1]], p[3:], start=n)])[0]
    assert max_abs_diff(a, b) < 1e-5  # the same keys and values, bit for bit


@pytest.mark.parametrize("kwargs, needle", [({"page_size": 8}, "multiple of 16"), ({"quant": "int4"}, "torch executor"),
                                            ({"dtype": "fp16"}, "dtype")])
def test_bad_options_are_refused_before_loading(smollm2, kwargs, needle):
    from workers.vllm_exec.executor import VllmExecutor

    with pytest.raises(ValueError, match=needle):
        VllmExecutor.from_loaded(smollm2, **kwargs)


def test_bench_rows_for_pie_vllm_and_vllms_engine(tmp_path, session_cache_dir):
    """`python -m workers.bench --executor vllm` measures pie-vllm, pie-torch and vLLM's own engine in one run."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    env = {**os.environ, "PIE_CACHE_DIR": session_cache_dir}
    done = subprocess.run([sys.executable, "-m", "workers.bench", "--executor", "vllm", "--dtypes", "fp32",
                           "--batches", "2", "--tokens", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    decode = {r["system"]: r["decode_tok_s"] for r in rows if r["decode_tok_s"] is not None}
    prefill = {r["system"]: r["prefill_tok_s"] for r in rows if r["prefill_tok_s"] is not None}
    for system in ("pie-vllm", "pie-torch", "vllm-engine", "vllm-engine-1p"):
        assert decode[system] > 0 and prefill[system] > 0, (system, rows)
    assert "vs vllm engine" in done.stdout and "vs engine 1p" in done.stdout


def test_a_model_directory_goes_to_vllm_as_it_is(smollm2, pair, chat_ids, tmp_path):
    """VllmExecutor.load(directory) hands the directory to vLLM (any architecture it supports) and reads only
    the tokenizer itself: a Hugging Face directory of the same weights gives the same log-probs."""
    import json
    import os

    from workers.vllm_exec.executor import VllmExecutor

    vx, _ = pair
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # what a Hugging Face directory holds
        os.symlink(os.path.join(smollm2.cache_dir, name), tmp_path / name)
    spec = smollm2.tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": spec.eos_token, "bos_token": spec.bos_token, "chat_template": spec.chat_template}))
    direct = VllmExecutor.load(str(tmp_path), dtype="fp32", page_size=16, num_pages=8)
    assert direct.info.architecture == "llama" and direct.info.stop_token_ids == vx.info.stop_token_ids
    assert direct.tokenizer.encode("Paris") == vx.tokenizer.encode("Paris")
    with allocated(direct, 3) as p:
        got = step_logprobs(direct, [logprobs_request(direct, chat_ids, p, outputs=[len(chat_ids) - 1])])[0]
    with allocated(vx, 3) as p:
        want = step_logprobs(vx, [logprobs_request(vx, chat_ids, p, outputs=[len(chat_ids) - 1])])[0]
    assert max_abs_diff(got, want) < 1e-5  # the same weights through the same code


def test_a_directory_vllm_cannot_read_fails_naming_it(tmp_path):
    from workers.errors import ModelLoadError
    from workers.vllm_exec.executor import VllmExecutor

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="vLLM cannot serve"):
        VllmExecutor(str(tmp_path), tokenizer=None, name="empty")
