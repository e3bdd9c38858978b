"""One task of the agentic benchmark's ReAct workload (cluster/bench/agentic.py): ROUNDS rounds,
each TOKENS generated tokens then a tool call over HTTP whose answer is appended as the next user
turn. The instructions' KV is computed once and shared (export / import); the conversation's KV
is kept across tool calls, so each round computes only the observation's tokens.

    pie run --allow-http 127.0.0.1:PORT inferlets/bench/react_task.py -- --tool http://127.0.0.1:PORT/ --task 0
"""
import argparse
import json

from wit_world.imports import model

from pie_sdk import Context, HostError, http, send
from pie_sdk.runtime import unwrap

SYSTEM = ("You are an agent. Think about the task, then call the search tool; read its observation "
          "and continue until the task is done.")


def template(messages, add_generation_prompt):
    return unwrap(model.apply_chat_template, list(messages), add_generation_prompt)


def instructions(name):
    try:
        return Context.import_(name)
    except (HostError, ValueError):
        ctx = Context()
        ctx.fill_chat([("system", SYSTEM)], add_generation_prompt=False)
        ctx.flush()
        try:
            ctx.export(name)
        except HostError:
            pass  # another task exported it meanwhile
        return ctx


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="react_task")
    ap.add_argument("--tool", required=True)
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--share", default="react-bench-instructions")
    opts = ap.parse_args(args)
    history = [("system", SYSTEM), ("user", f"Task {opts.task}: find three facts about city number {opts.task}.")]
    with instructions(opts.share) as base:
        ctx = base.fork()
    with ctx:
        ctx.fill_chat(history[1:], after=history[:1])
        for round_ in range(opts.rounds):
            text = ctx.generate(opts.tokens, stop_tokens=())  # exactly --tokens tokens: the same work every run
            history.append(("assistant", text))
            reply = http.post(opts.tool, json.dumps({"task": opts.task, "round": round_}))
            # what the template writes after the assistant's text (its end of turn), then the observation's turn
            head = template(history[:-1], True)
            closed = template(history, False)
            ctx.fill(closed[len(head) + len(text):] if closed.startswith(head + text) else "")
            history.append(("user", f"Observation: {reply.text}"))
            ctx.fill_chat(history[-1:], after=history[:-1])
            send(json.dumps({"round": round_}))
