"""A ReAct agent next to the model: it thinks, calls a tool over HTTP, reads the observation into
the same KV cache, and thinks again, for a few rounds; then it answers.

What only a program next to the model can do, shown here: the instructions' KV is computed once
and shared by every agent (exported under --share, imported by the others); the conversation's KV
is kept across tool calls (only the observation is new each round, never the whole history); each
observation's KV is dropped once the next thought is written, so long tool output costs no
attention later (--keep-observations to keep them). A thought's actions run at once, and its KV is
written while they do: the tool calls overlap the model's work.

    pie run --allow-http 127.0.0.1:8080 inferlets/examples/agents/react.py -- \\
        --tool http://127.0.0.1:8080/search --question "Where is the Eiffel Tower?" --rounds 3

Each round sends one JSON message ({"round", "thought", "actions", "observation"}), then one with
{"answer"}. The tool gets a POST with {"tool": NAME, "input": TEXT} and answers text.
"""
import argparse
import json
import re

from pie_sdk import Context, HostError, http, send

INSTRUCTIONS = ("Answer the question by thinking step by step. After each thought, write one action as "
                "Action: search[query], then read the Observation. When you know the answer, write "
                "Final Answer: and the answer.")
ACTION = re.compile(r"Action:\s*(\w+)\[(.*?)\]")


def shared_instructions(name):
    """A context holding the instructions: imported when another agent exported it, else computed and exported."""
    if name:
        try:
            return Context.import_(name)
        except (HostError, ValueError):
            pass
    ctx = Context()
    ctx.fill_chat([("system", INSTRUCTIONS)], add_generation_prompt=False)
    ctx.flush()
    if name:
        try:
            ctx.export(name)
        except HostError:
            pass  # another agent exported it meanwhile: this one keeps its own copy
    return ctx


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="react")
    ap.add_argument("--tool", required=True, help="the tool's URL (its host must be allowed: --allow-http)")
    ap.add_argument("--question", default="Where is the Eiffel Tower?")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per thought")
    ap.add_argument("--share", default="", help="export name of the instructions' KV, shared by every agent")
    ap.add_argument("--keep-observations", action="store_true")
    ap.add_argument("--max-actions", type=int, default=4, help="actions of one thought, run at once")
    opts = ap.parse_args(args)

    with shared_instructions(opts.share) as base:
        ctx = base.fork()
    with ctx:
        ctx.fill_chat([("user", opts.question)], after=[("system", INSTRUCTIONS)])
        ctx.fill("Thought:")
        observation_slots = None
        for round_ in range(opts.rounds):
            thought = ctx.generate(opts.max_tokens, stop_strings=["Observation:"]).strip()
            if observation_slots and not opts.keep_observations:
                ctx.drop(*observation_slots)  # the last observation is read (this thought attended to it)
            final = thought.partition("Final Answer:")[2].strip()
            if final:
                send(json.dumps({"answer": final}))
                return
            actions = ACTION.findall(thought)[:opts.max_actions] or [("search", thought[-200:] or opts.question)]
            calls = [http.start("POST", opts.tool, [("Content-Type", "application/json")],
                                json.dumps({"tool": tool, "input": text})) for tool, text in actions]
            ctx.fill("\nObservation: ")
            ctx.flush()  # the thought's KV is written while the tools run
            observation = "\n".join(call.result().text[:600] for call in calls)  # every action's, at once
            send(json.dumps({"round": round_, "thought": thought, "actions": [list(a) for a in actions],
                             "observation": observation}))
            start = ctx.kv_len + len(ctx.pending)  # the slot the observation's first token will fill
            ctx.fill(observation)
            observation_slots = (start, ctx.kv_len + len(ctx.pending))
            ctx.fill("\nThought:")
        send(json.dumps({"answer": ctx.generate(opts.max_tokens, stop_strings=["\n"]).strip()}))
