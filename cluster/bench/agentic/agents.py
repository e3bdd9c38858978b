"""The agent workloads: ReAct (a tool over HTTP), CodeAct (model-written code run where the agent
runs) and a swarm (teams of agents reading each other's thoughts), all in
inferlets/bench/agent_task.py on the inferlet side. Each agent runs ROUNDS rounds of TOKENS
greedy tokens (end of turn ignored, so both sides do the same work) and appends its action's
result as the next user turn; the client loop sends the whole conversation to
/v1/chat/completions each round, as a client of a monolithic server does."""
from __future__ import annotations

import threading

from cluster.bench.agentic.workload import INFERLETS, Env, Workload

TOOL_SYSTEM = ("You are an agent. Think about the task, then call the search tool; read its observation "
               "and continue until the task is done.")
CODE_SYSTEM = ("You are an agent that acts by writing Python. Think, then write code that stores its answer "
               "in result; read its output and continue until the task is done.")
TEAM_SYSTEM = ("You are one agent of a team. Think about the task, share your thought, read your teammates' "
               "thoughts and continue until the task is done.")
CODE = "result = sum(k * k for k in range({task} * 100 + {round} * 1000 + 5000))"  # what CodeAct runs each round


def first_turn(i: int) -> str:
    return f"Task {i}: find three facts about city number {i}."  # as agent_task.py


def run_code(source: str) -> str:
    """The client loop's CodeAct action, in the client's process (agent_task.run_code in the sandbox)."""
    scope: dict = {}
    try:
        exec(source, scope)
        return f"Out: {scope.get('result')}"
    except Exception as e:
        return f"Error: {e!r}"


_boards_lock = threading.Lock()


def team_exchange(i: int, round_: int, thought: str, env: Env) -> str:
    """The client loop's swarm action: post the thought on the team's board, wait for every teammate's."""
    size = env.sizes["team"]
    with _boards_lock:
        board = env.shared.setdefault(f"team-{i // size}", {"barrier": threading.Barrier(size), "said": {}})
    board["said"][(round_, str(i))] = thought
    board["barrier"].wait(timeout=600)
    heard = {name: text for (r, name), text in board["said"].items() if r == round_ and name != str(i)}
    return "Teammates: " + "; ".join(f"agent {k}: {heard[k]}" for k in sorted(heard))


def tool_call(i: int, round_: int, _thought: str, env: Env) -> str:
    import requests

    return "Observation: " + requests.post(env.tool_url, json={"task": i, "round": round_}, timeout=60).text


def agent_client(system: str, act):
    def task(i: int, env: Env) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": first_turn(i)}]
        for round_ in range(env.sizes["rounds"]):
            reply = env.client.chat.completions.create(model=env.model, messages=messages,
                                                       max_tokens=env.sizes["tokens"], temperature=0,
                                                       extra_body={"ignore_eos": True})
            thought = reply.choices[0].message.content
            messages.append({"role": "assistant", "content": thought})
            messages.append({"role": "user", "content": act(i, round_, thought, env)})
    return task


def agent_args(act: str, system: str):
    def args(i: int, env: Env) -> list:
        s = env.sizes
        common = ["--act", act, "--system", system, "--task", i, "--rounds", s["rounds"], "--tokens", s["tokens"],
                  "--share", f"{act}-{env.run_id}"]
        if act == "tool":
            return common + ["--tool", env.tool_url]
        if act == "code":
            return common + ["--code", CODE]
        return common + ["--team", f"swarm-{env.run_id}-{i // s['team']}", "--team-size", s["team"]]
    return args


def _rounds(s: dict) -> str:
    return f"{s['tasks']} tasks x {s['rounds']} rounds of {s['tokens']} tokens"


REACT = Workload("react", INFERLETS / "agent_task.py", agent_args("tool", TOOL_SYSTEM),
                 agent_client(TOOL_SYSTEM, tool_call),
                 {"tasks": 32, "rounds": 8, "tokens": 24}, {"tasks": 4, "rounds": 2, "tokens": 8},
                 lambda s: f"{_rounds(s)}, then a {s['tool_ms']:g} ms HTTP tool")
CODEACT = Workload("codeact", INFERLETS / "agent_task.py", agent_args("code", CODE_SYSTEM),
                   agent_client(CODE_SYSTEM, lambda i, r, _t, _e: run_code(CODE.format(task=i, round=r))),
                   {"tasks": 16, "rounds": 6, "tokens": 24}, {"tasks": 4, "rounds": 2, "tokens": 8},
                   lambda s: f"{_rounds(s)}, then a sum of squares run in Python")
SWARM = Workload("swarm", INFERLETS / "agent_task.py", agent_args("team", TEAM_SYSTEM),
                 agent_client(TEAM_SYSTEM, team_exchange),
                 {"tasks": 16, "team": 4, "rounds": 4, "tokens": 24}, {"tasks": 4, "team": 2, "rounds": 2, "tokens": 8},
                 lambda s: f"{_rounds(s)} in teams of {s['team']}, each reading its teammates' thoughts")
