"""vLLM's own engine (its LLM class) on a model directory, with workers.bench's protocol; prints JSON rows.

    python workers/bench_vllm_engine.py MODEL_DIR DTYPE TOKENS BATCHES PROMPTS_JSON OUT_JSON

Run by `python -m workers.bench --executor vllm` in a subprocess: the engine starts worker processes
of its own and its one-rank distributed state would clash with the vLLM executor's in one process.
PROMPTS_JSON holds the token ids of the chat prompts by batch size and the 512-token prefill prompt,
encoded by our tokenizer, so both systems see the same tokens; the rows go to OUT_JSON. Prefix caching is off: every run
computes its prompts, as our executor does. Rows are named "vllm-engine", or "vllm-engine-1p" when
VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process (no second process, no IPC).
"""
import json
import os
import sys
import time


def main() -> None:
    model_dir, dtype, tokens, batches, prompts_path, out_path = sys.argv[1:7]
    tokens = int(tokens)
    batches = [int(b) for b in batches.split(",")]
    with open(prompts_path) as f:
        prompts = json.load(f)
    from vllm import LLM, SamplingParams

    from workers.vllm_exec.model_setup import VLLM_DTYPES

    llm = LLM(model=model_dir, dtype=VLLM_DTYPES[dtype], enforce_eager=True,
              skip_tokenizer_init=True, max_num_seqs=max(batches), enable_prefix_caching=False,
              max_model_len=2048, kv_cache_memory_bytes=2 << 30)

    def run(ids: list[list[int]], n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        return time.perf_counter() - t

    system = "vllm-engine-1p" if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" else "vllm-engine"
    rows = []
    for b in batches:
        ids = prompts["decode"][str(b)]
        run(ids, 4)  # warm up
        t1, tn = run(ids, 1), run(ids, tokens)
        rows.append({"system": system, "dtype": dtype, "quant": "none", "batch": b,
                     "decode_tok_s": b * (tokens - 1) / (tn - t1), "prefill_tok_s": None})
    prefill = prompts["prefill"]
    run([prefill], 1)
    best = min(run([[t + k for t in prefill]], 1) for k in range(1, 4))  # new tokens each time: nothing reused
    rows.append({"system": system, "dtype": dtype, "quant": "none", "batch": 1, "decode_tok_s": None,
                 "prefill_tok_s": len(prefill) / best})
    with open(out_path, "w") as f:  # not stdout: vLLM logs there
        json.dump(rows, f)


if __name__ == "__main__":
    main()
