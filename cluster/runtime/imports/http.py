"""http: outbound requests to the hosts the deployment allows (see cluster/services/http_client.py)."""
from __future__ import annotations

from cluster.runtime.imports._common import timeout_s, waiting
from cluster.pending import Pending
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import record


def imports(s: InferletSession) -> dict:
    client = s.services.http

    def request(method: str, url: str, headers, body: bytes, timeout_ms) -> Pending:
        result = client.request(method, url, [tuple(h) for h in headers], bytes(body), timeout_s=timeout_s(timeout_ms))
        out = Pending()
        result.on_done(lambda r: out.fail(r.error) if r.error else out.complete(
            record(status=r.value.status, headers=list(r.value.headers), body=r.value.body)))
        return out

    return {"request": waiting(s, request)}
