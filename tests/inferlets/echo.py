"""A test inferlet: says "ready", then sends back each client message until it receives "quit".

An argument N makes it hold N KV pages while it waits, so a test can watch a stopped echo give
them back.
"""
from wit_world.imports import kv

from pie_sdk import receive, send
from pie_sdk.runtime import unwrap


def main(args: list[str]) -> None:
    held = unwrap(kv.allocate, int(args[0])) if args else []
    send(f"ready, holding {len(held)} pages")
    while True:
        message = receive()
        if message is None or message == "quit":
            return
        send(message)
