"""Hierarchical attention with custom masks: a document of sections where each section's tokens
attend only to the shared header and to their own section (the local level), and the question
and answer attend to everything (the global level). Sections are encoded independently of each
other, as if each were alone after the header, yet all sit in one KV cache at their positions.
--causal writes the sections with the ordinary causal mask instead, for comparison.

    pie run inferlets/examples/kv/hierarchical_attention.py -- --section "Paris is in France." \\
        --section "Rome is in Italy." --question "Where is Rome?"

It sends, per section, the top next tokens after its last token as that token saw the document
(with the mask: the header and its own section only), then the answer.
"""
import argparse
import json

from pie_sdk import Context, runs_attending, send
from pie_sdk.runtime import unwrap
from wit_world.imports import model

HEADER = "Notes, one per line.\n"


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="hierarchical_attention")
    ap.add_argument("--section", action="append", default=None, help="a section's text (repeatable)")
    ap.add_argument("--question", default="Which countries do the notes name?")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--causal", action="store_true", help="no custom mask: each section sees those before it")
    ap.add_argument("--top", type=int, default=5)
    opts = ap.parse_args(args)
    sections = opts.section or ["Paris is the capital of France.", "Rome is the capital of Italy.",
                                "Madrid is the capital of Spain."]
    with Context() as ctx:
        ctx.fill(HEADER)
        ctx.flush()
        header_end = ctx.kv_len
        probes = []
        for text in sections:
            tokens = unwrap(model.encode, text + "\n")
            start = ctx.kv_len
            end = start + len(tokens)
            mask = [runs_attending(end, [(0, start + j + 1)] if opts.causal
                                   else [(0, header_end), (start, start + j + 1)]) for j in range(len(tokens))]
            ids, probs = ctx.write(tokens, mask, top_k=opts.top)
            probes.append({"section": text, "tokens": len(tokens), "next": list(ids), "probs": list(probs)})
            send(json.dumps(probes[-1]))
        ctx.fill_chat([("user", opts.question)])  # the question and the answer see every section
        send(json.dumps({"answer": ctx.generate(opts.max_tokens).strip(), "kv_len": ctx.kv_len}))
