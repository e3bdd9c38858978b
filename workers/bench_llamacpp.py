"""llama.cpp's decode and prefill on a GGUF file, with workers.bench's protocol; prints one JSON list.

Run by `python -m workers.bench --llamacpp` with an interpreter that has llama-cpp-python
(`--llamacpp-python PATH`, default this one). It imports nothing of ours, so any venv with
llama-cpp-python runs it:  PYTHON workers/bench_llamacpp.py GGUF TOKENS THREADS
Decode: greedy, EOS ignored, the chat prompt "Tell me a long story, number 0.", rate =
(N - 1) / (time for N new tokens - time for 1). Prefill: 512 tokens, best of 3.
"""
import json
import sys
import time


def main() -> None:
    from llama_cpp import Llama

    path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    prompt = llm.tokenize(b"<|im_start|>user\nTell me a long story, number 0.<|im_end|>\n<|im_start|>assistant\n",
                          special=True)

    def generate(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1)):
            if i + 1 >= n:
                break
        return time.perf_counter() - t

    generate(4)
    t1, tn = generate(1), generate(tokens)
    ids = [100 + (i * 7919) % 39000 for i in range(512)]
    best = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t)
    print(json.dumps([
        {"system": "llama.cpp", "dtype": "q4_1", "quant": "gguf", "batch": 1,
         "decode_tok_s": (tokens - 1) / (tn - t1), "prefill_tok_s": None},
        {"system": "llama.cpp", "dtype": "q4_1", "quant": "gguf", "batch": 1, "decode_tok_s": None,
         "prefill_tok_s": 512 / best}]))


if __name__ == "__main__":
    main()
