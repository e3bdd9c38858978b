"""Outbound HTTP to the hosts the deployment allows (HostError names the cause otherwise)."""
import json as _json

from wit_world.imports import http

from pie_sdk.runtime import unwrap


class Response:
    def __init__(self, raw):
        self.status = raw.status
        self.headers = list(raw.headers)
        self.body = bytes(raw.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return _json.loads(self.body)


def request(method: str, url: str, headers=None, body: bytes = b"", timeout_ms=None) -> Response:
    return Response(unwrap(http.request, method, url, list(headers or []), bytes(body), timeout_ms))


def get(url: str, headers=None, timeout_ms=None) -> Response:
    return request("GET", url, headers, b"", timeout_ms)


def post(url: str, body, headers=None, timeout_ms=None) -> Response:
    if isinstance(body, str):
        body = body.encode()
    return request("POST", url, headers, body, timeout_ms)
