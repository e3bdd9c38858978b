"""Waits on one HTTP request to argv[0] (a slow tool), started without blocking, then sends its body."""
from pie_sdk import http, send


def main(args: list[str]) -> None:
    pending = http.start("GET", args[0])
    send(pending.result().text)
