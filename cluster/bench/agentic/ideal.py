"""ReAct's ideal time: the engine's own figures for the same work, measured in the same run with
the plain decode loop: ROUNDS * TOKENS decode steps at batch TASKS, every filled token (prompts and
observations) at the prefill rate of one 512-token prompt, and ROUNDS tool latencies."""
from __future__ import annotations

import time

from cluster.bench.agentic.agents import TOOL_SYSTEM, first_turn
from cluster.bench.tax import run_plain
from cluster.runtime.inferlet_host import InferletHost

OBSERVATION_TOKENS = 45  # what one round appends: the end of turn, the observation's turn, the next prompt


def ideal_seconds(host: InferletHost, sizes: dict) -> dict:
    from workers.decode_loop import generate

    prompts = [first_turn(i) for i in range(sizes["tasks"])]
    plain = run_plain(host, prompts, max(sizes["tokens"], 2))
    tok = host.executor.tokenizer
    long_prompt = (tok.encode(" ".join(prompts)) * 64)[:512]
    t0 = time.perf_counter()
    host.worker.batcher.call(lambda ex: generate(ex, [long_prompt], 1)).wait(600)
    prefill_tok_s = 512 / (time.perf_counter() - t0)
    prompt_tokens = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": TOOL_SYSTEM},
                                                            {"role": "user", "content": prompts[0]}])))
    filled = sizes["tasks"] * (prompt_tokens + sizes["rounds"] * OBSERVATION_TOKENS)
    decode_s = sizes["rounds"] * sizes["tokens"] * plain["tpot_ms"] / 1e3
    prefill_s = filled / prefill_tok_s
    tools_s = sizes["rounds"] * sizes["tool_ms"] / 1e3
    return {"seconds": decode_s + prefill_s + tools_s, "decode_s": decode_s, "prefill_s": prefill_s,
            "tools_s": tools_s, "decode_step_ms": plain["tpot_ms"], "prefill_tok_s": prefill_tok_s,
            "filled_tokens": filled}
