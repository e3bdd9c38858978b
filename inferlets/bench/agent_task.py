"""One agent of the agentic benchmark (cluster/bench/agentic/): ROUNDS rounds, each TOKENS generated
tokens (end of turn ignored: the same work every run) then an action whose result is appended as
the next user turn:
  --act tool   POST to --tool and read its answer (ReAct)
  --act code   run --code (formatted with task and round) in this inferlet's own sandbox (CodeAct)
  --act team   broadcast the thought on --team's topic and read the --team-size - 1 others' (swarm)
The instructions' KV is computed once and shared by every agent (export / import under --share),
and the conversation's KV is kept across actions: each round computes only the new turn.

    pie run --allow-http 127.0.0.1:PORT inferlets/bench/agent_task.py -- --act tool --tool http://127.0.0.1:PORT/
"""
import argparse
import json

from wit_world.imports import model

from pie_sdk import Context, HostError, http, messaging, send, sleep
from pie_sdk.runtime import unwrap


def template(messages, add_generation_prompt):
    return unwrap(model.apply_chat_template, list(messages), add_generation_prompt)


def instructions(name, system):
    try:
        return Context.import_(name)
    except (HostError, ValueError):
        ctx = Context()
        ctx.fill_chat([("system", system)], add_generation_prompt=False)
        ctx.flush()
        try:
            ctx.export(name)
        except HostError:
            pass  # another agent exported it meanwhile
        return ctx


def run_code(source):
    scope = {}
    try:
        exec(source, scope)  # the sandbox is the inferlet's: no files, no network
        return f"Out: {scope.get('result')}"
    except Exception as e:  # the model's code failing is an observation, not the agent's end
        return f"Error: {e!r}"


class Team:
    """This agent's teammates over messaging: every round each one broadcasts its thought once."""

    def __init__(self, topic, size, name):
        self.topic, self.size, self.name, self.early = topic, size, name, []
        messaging.subscribe(topic)
        messaging.store_set(f"{topic}/{name}", "ready")
        while len(messaging.store_keys(f"{topic}/")) < size:  # everyone listens before anyone speaks
            sleep(5)

    def exchange(self, round_, thought):
        messaging.broadcast(self.topic, json.dumps({"from": self.name, "round": round_, "text": thought}))
        heard, waiting, self.early = {}, self.early, []

        def take(message):
            if message["round"] == round_:
                heard[message["from"]] = message["text"]
            else:
                self.early.append(message)  # a faster teammate's next round

        for message in waiting:
            take(message)
        while len(heard) < self.size - 1:
            message = messaging.next_broadcast(self.topic, 600_000)
            if message is None:
                raise TimeoutError(f"round {round_}: heard {len(heard)} of {self.size - 1} teammates in 10 minutes")
            take(json.loads(message))
        return "Teammates: " + "; ".join(f"agent {k}: {heard[k]}" for k in sorted(heard))


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="agent_task")
    ap.add_argument("--act", choices=["tool", "code", "team"], default="tool")
    ap.add_argument("--system", required=True)
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--share", default="agent-bench-instructions")
    ap.add_argument("--tool", default="")
    ap.add_argument("--code", default="result = {task} + {round}")
    ap.add_argument("--team", default="")
    ap.add_argument("--team-size", type=int, default=1)
    opts = ap.parse_args(args)
    team = Team(opts.team, opts.team_size, str(opts.task)) if opts.act == "team" else None
    history = [("system", opts.system), ("user", f"Task {opts.task}: find three facts about city number {opts.task}.")]
    with instructions(opts.share, opts.system) as base:
        ctx = base.fork()
    with ctx:
        ctx.fill_chat(history[1:], after=history[:1])
        for round_ in range(opts.rounds):
            text = ctx.generate(opts.tokens, stop_tokens=())
            history.append(("assistant", text))
            if opts.act == "tool":
                observation = "Observation: " + http.post(opts.tool, json.dumps({"task": opts.task, "round": round_})).text
            elif opts.act == "code":
                observation = run_code(opts.code.format(task=opts.task, round=round_))
            else:
                observation = team.exchange(round_, text)
            # what the template writes after the assistant's text (its end of turn), then the new user turn
            head = template(history[:-1], True)
            closed = template(history, False)
            ctx.fill(closed[len(head) + len(text):] if closed.startswith(head + text) else "")
            history.append(("user", observation))
            ctx.fill_chat(history[-1:], after=history[:-1])
            send(json.dumps({"round": round_}))
