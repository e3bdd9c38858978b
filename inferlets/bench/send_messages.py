"""Benchmark inferlet: send COUNT messages of SIZE bytes to the client without running the model, then
stay HOLD_MS milliseconds before ending (holding its place on its host: what makes an elastic pool grow).

What the event relay (host -> gateway -> client) costs per message, apart from any model step:

    pie run inferlets/bench/send_messages.py -- 1000 16
"""
from pie_sdk import send, sleep


def main(args):
    count = int(args[0]) if args else 100
    size = int(args[1]) if len(args) > 1 else 16
    hold_ms = int(args[2]) if len(args) > 2 else 0
    text = "x" * size
    for _ in range(count):
        send(text)
    if hold_ms:
        sleep(hold_ms)
