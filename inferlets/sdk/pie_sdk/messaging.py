"""Talking to other inferlets (on the same host in embedded mode, anywhere in the cluster in cluster mode):
topics, queues and a small key-value store."""
from wit_world.imports import messaging

from pie_sdk.runtime import unwrap


def subscribe(topic: str) -> None:
    unwrap(messaging.subscribe, topic)


def unsubscribe(topic: str) -> None:
    messaging.unsubscribe(topic)


def broadcast(topic: str, message: str) -> int:
    """Send to every subscriber of `topic` but yourself; returns how many received it."""
    return unwrap(messaging.broadcast, topic, message)


def next_broadcast(topic: str, timeout_ms=None):
    """The next message on a subscribed topic, or None when timeout_ms passes first."""
    return unwrap(messaging.next_broadcast, topic, timeout_ms)


def push(queue: str, message: str) -> None:
    unwrap(messaging.push, queue, message)


def pull(queue: str, timeout_ms=None):
    """The oldest message of `queue` (each goes to one puller), or None on timeout."""
    return unwrap(messaging.pull, queue, timeout_ms)


def store_set(key: str, value: str) -> None:
    unwrap(messaging.store_set, key, value)


def store_get(key: str):
    return unwrap(messaging.store_get, key)


def store_delete(key: str) -> bool:
    return unwrap(messaging.store_delete, key)


def store_keys(prefix: str = "") -> list:
    return list(unwrap(messaging.store_keys, prefix))
