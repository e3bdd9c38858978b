"""Chat with a model straight on the torch executor, streaming the answer:

    python -m workers.generate --prompt "What is the capital of France?" [--model SPEC] [--max-tokens N]
"""
from __future__ import annotations

import argparse
import sys

from workers.decode_loop import Sequence, generate
from workers.step_types import Sampler
from workers.torch_executor import DTYPES, TorchExecutor


class TextStream:
    """Prints the text of newly generated tokens, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.printed = tokenizer, 0
        self.out = out or sys.stdout  # looked up now, not at import: stdout may have been redirected

    def __call__(self, live: list[Sequence]) -> None:
        seq = live[0]
        ids = [t for t in seq.generated if t not in self.tokenizer.stop_token_ids]
        text = self.tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate a chat answer with the torch executor.")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--model", default=None, help="a .gguf file, a model directory or a hub id (default: SmolLM2)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    ex = TorchExecutor.load(args.model, dtype=args.dtype)
    tok = ex.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    sampler = Sampler() if args.temperature <= 0 else Sampler("sample", temperature=args.temperature, seed=args.seed)
    generate(ex, [prompt], args.max_tokens, sampler, on_step=TextStream(tok))
    print()


if __name__ == "__main__":
    main()
