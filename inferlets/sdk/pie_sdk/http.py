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


class InFlight:
    """A request started with `start`: the inferlet goes on, then takes the response with result()."""

    def __init__(self, handle):
        self.handle = handle
        self._response = None

    def result(self) -> Response:
        if self._response is None:
            self._response = Response(unwrap(http.await_response, self.handle))
        return self._response


def start(method: str, url: str, headers=None, body=b"", timeout_ms=None) -> InFlight:
    """Send a request without waiting for it (a tool call to overlap with generation, or several at once)."""
    if isinstance(body, str):
        body = body.encode()
    return InFlight(unwrap(http.send, method, url, list(headers or []), bytes(body), timeout_ms))


def get(url: str, headers=None, timeout_ms=None) -> Response:
    return request("GET", url, headers, b"", timeout_ms)


def post(url: str, body, headers=None, timeout_ms=None) -> Response:
    if isinstance(body, str):
        body = body.encode()
    return request("POST", url, headers, body, timeout_ms)
