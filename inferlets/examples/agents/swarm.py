"""A swarm: several agents (one inferlet each, launched with the same --topic) think about one
question, publish their thought on a topic, read the others', and each writes a final answer with
what it heard in its own KV. Messaging reaches every inferlet on the host, or the whole cluster.

    pie run inferlets/examples/agents/swarm.py -- --topic swarm-1 --size 3 --name a   (and b, c, at once)
"""
import argparse
import json

from pie_sdk import Context, messaging, send, sleep


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="swarm")
    ap.add_argument("--topic", default="swarm")
    ap.add_argument("--size", type=int, default=3, help="agents in the swarm, this one included")
    ap.add_argument("--name", default="agent")
    ap.add_argument("--question", default="What makes a city pleasant to live in?")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--wait-ms", type=int, default=20000)
    opts = ap.parse_args(args)
    messaging.subscribe(opts.topic)
    messaging.store_set(f"{opts.topic}/{opts.name}", "ready")
    while len(messaging.store_keys(f"{opts.topic}/")) < opts.size:  # every agent subscribed before anyone speaks
        sleep(20)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.question)])
        thought = ctx.generate(opts.max_tokens).strip()
        messaging.broadcast(opts.topic, json.dumps({"from": opts.name, "thought": thought}))
        heard = []
        while len(heard) < opts.size - 1:
            message = messaging.next_broadcast(opts.topic, opts.wait_ms)
            if message is None:
                break
            heard.append(json.loads(message))
        others = "; ".join(f"{h['from']} said: {h['thought']}" for h in heard)
        ctx.fill_chat([("user", f"Others think: {others}. Now answer in one sentence.")],
                      after=[("user", opts.question), ("assistant", thought)])
        answer = ctx.generate(opts.max_tokens).strip()
    send(json.dumps({"name": opts.name, "thought": thought, "heard": [h["from"] for h in heard], "answer": answer}))
