"""messaging: topics, queues and the key-value store shared by the inferlets of this host (embedded) or of the
whole cluster (cluster mode: the bus in the directory actor's process, see cluster/rpc/bus_service.py)."""
from __future__ import annotations

from cluster.runtime.imports._common import raw, sync, timeout_s, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import tagged_err, tagged_ok


def imports(s: InferletSession) -> dict:
    bus, me = s.services.bus, s.instance_id

    def capped(timeout_ms):
        """A wait never outlives the inferlet's own wall-clock limit."""
        t = timeout_s(timeout_ms)
        return s.limits.wall_seconds if t is None else min(t, s.limits.wall_seconds)

    def next_broadcast(topic: str, timeout_ms):
        result = bus.next_broadcast(me, topic, capped(timeout_ms))
        return _tag_ok(result)

    def pull(queue: str, timeout_ms):
        return _tag_ok(bus.pull(me, queue, capped(timeout_ms)))

    return {
        "subscribe": sync(lambda topic: bus.subscribe(me, topic) and None),
        "unsubscribe": raw(lambda topic: _quietly(bus.unsubscribe, me, topic)),
        "broadcast": sync(lambda topic, message: bus.broadcast(me, topic, message)),
        "next-broadcast": waiting(s, next_broadcast, tagged_err),
        "push": sync(lambda queue, message: bus.push(me, queue, message)),
        "pull": waiting(s, pull, tagged_err),
        "store-set": sync(lambda key, value: bus.store_set(key, value)),
        "store-get": sync(lambda key: tagged_ok(bus.store_get(key)), tagged_err),
        "store-delete": sync(lambda key: bus.store_delete(key)),
        "store-keys": sync(lambda prefix: bus.store_keys(prefix)),
    }


def _tag_ok(pending):
    """result<option<string>, string> needs its ok case named; map the Pending's value."""
    out = Pending()
    pending.on_done(lambda p: out.fail(p.error) if p.error else out.complete(tagged_ok(p.value)))
    return out


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # unsubscribing from a topic it never joined is not an error worth a trap
        pass
