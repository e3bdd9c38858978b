"""HTTP for inferlets, to the hosts the deployment allows and nowhere else.

`HttpClient.request` checks the request at once (scheme, host against the allow-list, method,
headers, size) and raises HttpDenied when it is refused; an accepted request runs on a small
thread pool and its Pending completes with an HttpResponse or fails with HttpFailed.

Redirects are never followed: a 3xx is returned as it is, since its Location could name a host the
allow-list does not. Connections are built directly with http.client, so proxy settings from the
environment are never used. The allow-list matches host names as written in the URL; what a name
resolves to is the deployment's DNS.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import logging
import math
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cluster import metrics
from cluster.errors import HttpDenied, HttpFailed
from cluster.pending import Pending

log = logging.getLogger("pie.http")

KiB = 1024
MiB = 1024 * KiB

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers the client sets itself: letting the guest set them could desynchronise the framing.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls but tab
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")  # controls and spaces: http.client would refuse them late
_READ_CHUNK = 64 * KiB


@dataclass(frozen=True)
class HttpPolicy:
    # "host" (any port) or "host:port" ("[v6addr]:port" for IPv6); exact, case-insensitive host names.
    # Empty: inferlets get no HTTP at all.
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0  # seconds for one whole request: connect, send, headers and body read
    max_request_bytes: int = 1 * MiB  # bytes of request body + header names and values
    max_response_bytes: int = 4 * MiB  # bytes of response body; more fails the request
    # requests running at once (pool threads, mostly waiting on the network): agents each waiting on a
    # slow tool should not wait on each other too
    max_concurrent: int = 64
    # requests accepted but not yet running: they wait their turn (the wait counts against the inferlet's
    # wall-clock limit, not against the request's timeout); more are refused
    max_queued: int = 4096


@dataclass(frozen=True)
class HttpResponse:
    status: int  # HTTP status code; a 3xx redirect is returned, never followed
    headers: list[tuple[str, str]]  # as received, in order, repeated names kept
    body: bytes  # at most HttpPolicy.max_response_bytes


def check_allowed_hosts(entries) -> None:
    """Raise ValueError naming the first entry that is not 'host' or 'host:port'."""
    for entry in entries:
        _parse_allowed(entry)


def _parse_allowed(entry: str) -> tuple[str, int | None]:
    """("host", port or None) of an allow-list entry."""
    try:
        parts = urlsplit("//" + entry.strip())
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"allowed_hosts entry {entry!r} is not 'host' or 'host:port': {e}") from None
    if not host or parts.path or parts.username is not None:
        raise ValueError(f"allowed_hosts entry {entry!r} is not 'host' or 'host:port'")
    return host.lower(), port


class HttpClient:
    """Runs inferlets' HTTP requests on a thread pool, to allowed hosts only."""

    def __init__(self, policy: HttpPolicy):
        if isinstance(policy.allowed_hosts, str):
            raise ValueError("HttpPolicy.allowed_hosts is a tuple of host entries, not one string")
        if policy.max_concurrent < 1 or policy.timeout_s <= 0:
            raise ValueError("HttpPolicy needs max_concurrent >= 1 and timeout_s > 0")
        self.policy = policy
        self._allowed = [_parse_allowed(entry) for entry in policy.allowed_hosts]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=policy.max_concurrent, thread_name_prefix="pie-http")
        self._lock = threading.Lock()
        self._num_unfinished = 0  # accepted requests not yet finished: queued + running
        self._closed = False
        self._ssl_context = ssl.create_default_context()

    def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                timeout_s: float | None = None) -> Pending:
        """Send one request; a Pending of HttpResponse. Raises HttpDenied when the request is refused.

        timeout_s: the caller's own limit for the whole request, capped by the policy's (None: the policy's).
        """
        if timeout_s is None:
            timeout_s = self.policy.timeout_s
        elif not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise HttpDenied(f"timeout_s must be a number of seconds > 0, or None; got {timeout_s!r}")
        timeout_s = min(timeout_s, self.policy.timeout_s)
        host, port, scheme, target = self._check_url(url)
        self._check_method(method)
        self._check_headers_and_body(headers, body)
        with self._lock:
            if self._closed:
                raise HttpDenied("the HTTP client is closed: the host is shutting down")
            limit = self.policy.max_concurrent + self.policy.max_queued
            if self._num_unfinished >= limit:
                raise HttpDenied(
                    f"{self._num_unfinished} HTTP requests of this host are already in flight (limit {limit}); "
                    f"wait for some to finish before sending more")
            self._num_unfinished += 1
        pending = Pending()
        try:
            future = self._pool.submit(self._send, method, scheme, host, port, target, list(headers), body, timeout_s)
        except RuntimeError:  # close() ran since the check above
            with self._lock:
                self._num_unfinished -= 1
            raise HttpDenied("the HTTP client is closed: the host is shutting down") from None
        started = time.perf_counter()
        future.add_done_callback(lambda f: self._on_finished(f, pending, host, started))
        return pending

    def close(self) -> None:
        """Refuse new requests; queued ones fail, running ones finish within their timeout. Idempotent."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checks, on the caller's thread ----

    def _check_url(self, url: str) -> tuple[str, int, str, str]:
        """(host, port, scheme, request target) of an allowed URL; HttpDenied otherwise."""
        if not isinstance(url, str) or _URL_FORBIDDEN.search(url):
            raise HttpDenied(f"URL {url!r:.200} has spaces or control characters; percent-encode them")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise HttpDenied(f"URL {url!r:.200} cannot be parsed: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise HttpDenied(f"URL scheme {parts.scheme!r} is not allowed; only http and https are")
        if parts.username is not None or parts.password is not None:
            raise HttpDenied("credentials in the URL are not supported; send an Authorization header instead")
        host = (parts.hostname or "").lower()
        if not host:
            raise HttpDenied(f"URL {url!r:.200} has no host")
        port = _DEFAULT_PORTS[scheme] if port is None else port
        if not any(host == allowed and (allowed_port is None or allowed_port == port)
                   for allowed, allowed_port in self._allowed):
            if not self._allowed:
                raise HttpDenied("HTTP is disabled on this deployment (its allow-list of hosts is empty)")
            raise HttpDenied(
                f"host {host}:{port} is not allowed; the deployment's allow-list of hosts decides which "
                f"hosts inferlets may reach")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return host, port, scheme, target

    def _check_method(self, method: str) -> None:
        if method not in ALLOWED_METHODS:
            raise HttpDenied(f"HTTP method {method!r:.40} is not allowed; use one of {', '.join(ALLOWED_METHODS)}")

    def _check_headers_and_body(self, headers: list[tuple[str, str]], body: bytes) -> None:
        if not isinstance(body, (bytes, bytearray)):
            raise HttpDenied(f"a request body must be bytes, got {type(body).__name__}")
        size = len(body)
        for entry in headers:
            if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise HttpDenied(f"a header must be a (name, value) pair of strings, got {entry!r:.80}")
            name, value = entry
            if not _HEADER_NAME.fullmatch(name):
                raise HttpDenied(f"header name {name!r:.80} is not a valid HTTP token")
            if name.lower() in _RESERVED_HEADERS:
                raise HttpDenied(f"header {name!r} is set by the host's HTTP client; leave it out")
            if _HEADER_VALUE_FORBIDDEN.search(value) or not value.isascii():
                raise HttpDenied(f"the value of header {name!r} has control or non-ASCII characters")
            size += len(name) + len(value)
        if size > self.policy.max_request_bytes:
            raise HttpDenied(
                f"the request is {size} bytes of body and headers (limit {self.policy.max_request_bytes}); "
                f"send less per request")

    # ---- the request, on a pool thread ----

    def _send(self, method: str, scheme: str, host: str, port: int, target: str,
              headers: list[tuple[str, str]], body: bytes, timeout_s: float) -> HttpResponse:
        """The response, or HttpFailed naming the host and the cause."""
        where = f"{host}:{port}"
        deadline = time.monotonic() + timeout_s  # from the start of sending, not from being queued
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=self._ssl_context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        response = None
        try:
            conn.request(method, target, body=bytes(body) if body else None, headers=dict(_merge(headers)))
            sock = conn.sock  # kept: getresponse hands it to the response when the server will close
            _set_remaining(sock, deadline)
            response = conn.getresponse()
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self.policy.max_response_bytes:
                raise _TooLarge(int(declared))
            chunks, received = [], 0
            while True:
                _set_remaining(sock, deadline)
                # read1: one recv at most, so the deadline is checked between trickling bytes
                chunk = response.read1(min(_READ_CHUNK, self.policy.max_response_bytes + 1 - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > self.policy.max_response_bytes:
                    raise _TooLarge(received)
            return HttpResponse(response.status, response.getheaders(), b"".join(chunks))
        except _TooLarge as e:
            raise HttpFailed(
                f"the response from {where} is over the limit of {self.policy.max_response_bytes} bytes "
                f"({e.num_bytes}+ bytes); ask for less (a range, a page, a smaller resource)") from None
        except (TimeoutError, socket.timeout):
            raise HttpFailed(f"the request to {where} timed out after {timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise HttpFailed(f"the request to {where} failed: {type(e).__name__}: {e}") from None
        finally:
            if response is not None:
                response.close()
            conn.close()

    def _on_finished(self, future: concurrent.futures.Future, pending: Pending, host: str, started: float) -> None:
        """Free the request's slot first, so a callback that sends the next request finds room."""
        with self._lock:
            self._num_unfinished -= 1
        metrics.HTTP_SECONDS.observe(time.perf_counter() - started)
        metrics.HTTP_CALLS.labels("cancelled" if future.cancelled() else "failed" if future.exception() else
                                  "answered").inc()
        if future.cancelled():
            pending.fail(HttpFailed(f"the request to {host} was cancelled: the host is shutting down"))
            return
        error = future.exception()
        if error is None:
            pending.complete(future.result())
        elif isinstance(error, HttpFailed):
            pending.fail(error)
        else:  # a bug of ours, not the network's
            log.error("HTTP request to %s failed unexpectedly", host, exc_info=error)
            pending.fail(HttpFailed(f"the request to {host} failed: internal error {type(error).__name__}"))


class _TooLarge(Exception):
    def __init__(self, num_bytes: int):
        self.num_bytes = num_bytes


def _merge(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join repeated names with ", " (http.client takes a mapping), keeping first-seen order."""
    merged: dict[str, tuple[str, list[str]]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), (name, []))[1].append(value)
    return [(name, ", ".join(values)) for name, values in merged.values()]


def _set_remaining(sock: socket.socket, deadline: float) -> None:
    """Give the socket what is left of the request's time, so a slow drip cannot outlast timeout_s."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
