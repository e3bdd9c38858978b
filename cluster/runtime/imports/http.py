"""http: outbound requests to the hosts the deployment allows (see cluster/services/http_client.py)."""
from __future__ import annotations

from cluster.runtime.imports._common import sync, timeout_s, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused, record


def imports(s: InferletSession) -> dict:
    client = s.services.http
    in_flight: dict[int, Pending] = {}  # requests started with send, by handle

    def request(method: str, url: str, headers, body: bytes, timeout_ms) -> Pending:
        result = client.request(method, url, [tuple(h) for h in headers], bytes(body), timeout_s=timeout_s(timeout_ms))
        return result.map(lambda r: record(status=r.status, headers=list(r.headers), body=r.body))

    def send(method: str, url: str, headers, body: bytes, timeout_ms) -> int:
        if len(in_flight) >= s.limits.max_outstanding_http:
            raise Refused(f"more than {s.limits.max_outstanding_http} HTTP requests started and not awaited; "
                          f"await some first")
        pending = request(method, url, headers, body, timeout_ms)  # checked (and refused) here, at once
        handle = s.new_handle()
        in_flight[handle] = pending
        return handle

    def await_response(handle: int) -> Pending:
        pending = in_flight.pop(handle, None)
        if pending is None:
            raise Refused(f"no HTTP request with handle {handle} is in flight (each handle is awaited once)")
        return pending

    return {"request": waiting(s, request), "send": sync(send), "await-response": waiting(s, await_response)}
