"""What moving a running inferlet between workers costs it: the move's time, and its time per output token
against the same inferlet left where it is, in one run.

    python -m cluster.bench.moves [--tokens 96] [--moves 4] [--prompt-words 400] [--dtype bf16] [--json OUT]

One local Ray, 2 CPU worker actors (1 torch thread each), and a ClusterHost in this process (the
operator's side of a move: ClusterHost.move_inferlet, see cluster/actors/inferlet_move.py). The inferlet
is inferlets/examples/text_completion.py on a prompt of --prompt-words words (the pages it holds), making
--tokens tokens (--ignore-eos). Rows, in one run:
- unmoved: it runs on worker-0 from start to end (the peer);
- moved: the same, moved --moves times while it generates (worker-0 -> worker-1 -> worker-0 ...), each
  move started once it has sent a further 1 / (moves + 1) of the unmoved run's messages.
Per row: time to first token, median time between messages (a message a token, or one for several when
a character spans tokens: text_completion streams text), the longest gap, and the total; for the
moves: pages, MB, milliseconds a move (the gate closed to opened, what the inferlet's calls waited at
most) and the gap between its two messages around the move's end (the step the move held up).
The moved text must equal the unmoved one (greedy decoding over the same KV): the run fails otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_COMPLETION = ROOT / "inferlets" / "examples" / "text_completion.py"
WORDS = ("the keeper climbed the stairs of the old lighthouse every night to light the lamp and watch the sea "
         "for ships that might need its warning").split()


def progress(text: str) -> None:
    print(f"[moves] {text}", file=sys.stderr, flush=True)


def prompt(words: int) -> str:
    body = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return f"Summarise this in one sentence, then continue the story: {body}"


def run_once(host, arguments: list[str], moves: int, messages: int, page_bytes: int) -> dict:
    """One run of text_completion on worker-0, moved `moves` times while it sends its `messages` messages
    (a message a token, or fewer: the SDK streams whole characters)."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    running = host.launch(str(TEXT_COMPLETION), arguments, worker_id="worker-0",
                          on_message=lambda _: stamps.append(time.perf_counter()))
    moved, targets = [], ["worker-1", "worker-0"]
    for i in range(moves):
        due = (i + 1) * messages // (moves + 1)
        while len(stamps) < due and not running.done:
            time.sleep(0.002)
        if running.done:
            raise RuntimeError(f"the inferlet ended after {len(stamps)} messages, before move {i + 1} of {moves}")
        m = host.move_inferlet(running.instance_id, targets[i % 2])
        moved.append({"pages": m.num_pages, "mb": m.num_pages * page_bytes / 1e6, "ms": m.seconds * 1e3,
                      "ended": time.perf_counter()})
    outcome = running.wait(600)
    if not outcome.ok:
        raise RuntimeError(f"the inferlet failed: {outcome.error}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    for m in moved:  # the gap that spans the move's end: from the last message before it to the next one
        ended = m.pop("ended")
        after = next((i for i, t in enumerate(stamps) if t > ended), None)
        m["gap_ms"] = (stamps[after] - stamps[after - 1]) * 1e3 if after else None
    return {"text": "".join(outcome.messages), "messages": len(stamps), "ttft_ms": (stamps[0] - t0) * 1e3,
            "gap_ms_median": statistics.median(gaps) * 1e3, "gap_ms_max": max(gaps) * 1e3,
            "total_s": time.perf_counter() - t0, "moves": moved}


def measure(host, tokens: int, moves: int, prompt_words: int) -> dict:
    """Both rows on a running cluster (workers worker-0 and worker-1), through ClusterHost `host`."""
    source = host.connection("worker-0")
    holder = "moves-bench-probe"
    [page] = source.allocate(holder, 1, 1)
    page_bytes = len(source.wait(source.read_pages(holder, [page])))
    source.release(holder)
    arguments = ["--prompt", prompt(prompt_words), "--max-tokens", str(tokens), "--ignore-eos"]
    progress(f"unmoved run: {tokens} tokens after a {prompt_words}-word prompt ...")
    unmoved = run_once(host, arguments, 0, 0, page_bytes)
    progress(f"moved run: the same, moved {moves} times ...")
    moved = run_once(host, arguments, moves, unmoved["messages"], page_bytes)
    if moved["text"] != unmoved["text"]:
        raise RuntimeError(f"the moved inferlet wrote other text than the unmoved one:\n"
                           f"{moved['text']!r}\n{unmoved['text']!r}")
    return {"tokens": tokens, "prompt_words": prompt_words, "page_bytes": page_bytes, "unmoved": unmoved,
            "moved": moved, "total_ratio": moved["total_s"] / unmoved["total_s"]}


def print_table(results: dict) -> None:
    print(f"text_completion, {results['tokens']} tokens after a {results['prompt_words']}-word prompt "
          f"({results['page_bytes'] / 1e3:.0f} kB a page):")
    print(f"{'':>10} {'TTFT ms':>9} {'gap ms (median)':>16} {'gap ms (max)':>13} {'total s':>8}")
    for name in ("unmoved", "moved"):
        r = results[name]
        print(f"{name:>10} {r['ttft_ms']:9.0f} {r['gap_ms_median']:16.1f} {r['gap_ms_max']:13.1f} {r['total_s']:8.2f}")
    print(f"moved / unmoved total: {results['total_ratio']:.2f}x; the text is the same")
    print(f"{'move':>10} {'pages':>6} {'MB':>6} {'ms':>7} {'gap ms':>7}")
    for i, m in enumerate(results["moved"]["moves"], 1):
        gap = f"{m['gap_ms']:7.1f}" if m["gap_ms"] is not None else f"{'-':>7}"
        print(f"{i:>10} {m['pages']:6d} {m['mb']:6.1f} {m['ms']:7.1f} {gap}")


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster
    from cluster.actors.cluster_host import ClusterHost

    ap = argparse.ArgumentParser(prog="python -m cluster.bench.moves", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--moves", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=400, help="the prompt's length: the pages each move copies")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json", default=None, help="also write the results here")
    opts = ap.parse_args(argv)
    progress("starting a local Ray and the cluster (2 workers) ...")
    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        cluster = start_cluster(ClusterSpec(workers=2, hosts=1, torch_threads=1, bind_address="127.0.0.1",
                                            dtype=opts.dtype), wait=False)
        with ClusterHost(cluster.directory) as host:
            host.component(str(TEXT_COMPLETION))  # built and compiled while the workers load the model
            cluster.wait_for_workers()
            results = measure(host, opts.tokens, opts.moves, opts.prompt_words)
    finally:
        ray.shutdown()
    results["dtype"] = opts.dtype
    print_table(results)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
