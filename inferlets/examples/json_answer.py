"""Answer as JSON that follows a schema: a host-side grammar masks every token the schema forbids.

    pie run inferlets/examples/json_answer.py -- --question "What is the capital of France?"
"""
import argparse
import json

from pie_sdk import Context, Grammar, send

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 60},
                   "confident": {"type": "boolean"}},
    "required": ["answer", "confident"],
    "additionalProperties": False,
}


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="json_answer")
    ap.add_argument("--question", default="What is the capital of France?")
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("system", "Reply in JSON with the keys answer and confident."), ("user", opts.question)])
        text = ctx.generate(96, grammar=Grammar.json_schema(SCHEMA))
    send(json.dumps(json.loads(text)))  # it parses: the grammar allowed nothing else
