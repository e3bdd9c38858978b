"""CodeAct: the model writes Python, the inferlet runs it, and the result (or the error) becomes
the next observation. The code runs inside this inferlet's own sandbox: no files, no network, the
same fuel and memory limits as the rest of the program, so model-written code can hurt nothing
but this inferlet. Its KV stays across rounds; only each observation is new.

    pie run inferlets/examples/agents/codeact.py -- --task "Compute the sum of the squares of 1 to 10." --rounds 3
"""
import argparse
import contextlib
import io
import json
import re

from pie_sdk import Context, send

INSTRUCTIONS = ("Solve the task by writing Python code in a ```python block. The code's printed output "
                "comes back as the observation. When you know the answer, write Final Answer: and it.")
CODE = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)
SAFE_BUILTINS = {name: __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
                 for name in ("abs", "all", "any", "dict", "enumerate", "float", "int", "len", "list", "max",
                          "min", "print", "range", "reversed", "round", "sorted", "str", "sum", "tuple", "zip")}


def run_code(code: str) -> str:
    """The code's printed output, or its error; only plain builtins are in reach."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<model>", "exec"), {"__builtins__": SAFE_BUILTINS})
    except Exception as e:  # the model's code failing is an observation, not the inferlet's failure
        return f"{out.getvalue()}{type(e).__name__}: {e}"[:500]
    return out.getvalue()[:500] or "(no output)"


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="codeact")
    ap.add_argument("--task", default="Compute the sum of the squares of 1 to 10.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("system", INSTRUCTIONS), ("user", opts.task)])
        ctx.fill("```python\n")  # start the first answer inside a code block
        for round_ in range(opts.rounds):
            written = ctx.generate(opts.max_tokens, stop_strings=["```"])
            code = written if round_ == 0 else (CODE.search(written).group(1) if CODE.search(written) else "")
            final = written.partition("Final Answer:")[2].strip()
            if final:
                send(json.dumps({"answer": final}))
                return
            observation = run_code(code) if code.strip() else "(no code block)"
            send(json.dumps({"round": round_, "code": code, "observation": observation}))
            ctx.fill(f"```\nObservation: {observation}\n")
        send(json.dumps({"answer": None}))
