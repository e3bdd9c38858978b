"""The inferlets' HTTP client against a real local server: allow-list, redirects, timeouts, limits."""
import http.server
import socket
import sys
import threading
import time

import pytest

from cluster.errors import HttpDenied, HttpFailed
from cluster.services.http_client import HttpClient, HttpPolicy, HttpResponse

WAIT = 5.0  # seconds a test waits for a request that should finish quickly; only hit on failure
SLOW_S = 2.0  # how long /slow sleeps; the client's timeout in the timeout tests is 0.3 s


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, status: int, body: bytes, headers=(), content_length=True):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if content_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append((self.command, self.path))
        if self.path == "/redirect":
            self._reply(302, b"", [("Location", f"http://127.0.0.1:{self.server.other_port}/secret")])
        elif self.path.startswith("/slow"):  # /slow?seconds=X, SLOW_S by default
            time.sleep(float(self.path.partition("seconds=")[2] or SLOW_S))
            self._reply(200, b"late")
        elif self.path == "/drip":  # a byte every 0.1 s for SLOW_S: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", str(int(SLOW_S * 10)))
            self.end_headers()
            for _ in range(int(SLOW_S * 10)):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(5):
                self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")  # 0x3e8 = 1000 bytes
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/big"):
            self._reply(200, b"x" * 5000, content_length=self.path != "/big-no-length")
        else:
            self._reply(200, f"GET {self.path} x-test={self.headers.get('X-Test')}".encode(),
                        [("X-Reply", "a"), ("X-Reply", "b")])

    def do_POST(self):
        self.server.requests.append((self.command, self.path))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(201, b"echo:" + body, [("Content-Type", self.headers.get("Content-Type", ""))])


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up, as timeouts do
            super().handle_error(request, client_address)


def _serve() -> _Server:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.requests = []  # (method, path) of every request it received
    server.other_port = 0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    """Two servers: the allowed one and another one (the redirect target, never allowed)."""
    allowed, other = _serve(), _serve()
    allowed.other_port = other.server_address[1]
    yield allowed, other
    for server in (allowed, other):
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(servers):
    allowed, other = servers
    allowed.requests.clear()
    other.requests.clear()
    return allowed


def _client(server, **policy) -> HttpClient:
    return HttpClient(HttpPolicy(allowed_hosts=(f"127.0.0.1:{server.server_address[1]}",), **policy))


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_get_round_trip(server):
    with _client(server) as client:
        response = client.request("GET", _url(server, "/hello?q=1"), [("X-Test", "yes")], b"").wait(WAIT)
    assert isinstance(response, HttpResponse)
    assert response.status == 200
    assert response.body == b"GET /hello?q=1 x-test=yes"
    assert [v for k, v in response.headers if k == "X-Reply"] == ["a", "b"]
    assert server.requests == [("GET", "/hello?q=1")]


def test_post_round_trip(server):
    with _client(server) as client:
        pending = client.request("POST", _url(server, "/submit"), [("Content-Type", "application/json")],
                                 b'{"a": 1}')
        response = pending.wait(WAIT)
    assert response.status == 201
    assert response.body == b'echo:{"a": 1}'
    assert ("Content-Type", "application/json") in response.headers


def test_a_host_entry_without_port_allows_any_port_case_insensitively(server):
    with HttpClient(HttpPolicy(allowed_hosts=("LocalHost",))) as client:
        response = client.request("GET", f"http://LOCALHOST:{server.server_address[1]}/x", [], b"").wait(WAIT)
    assert response.status == 200


def test_disallowed_hosts_are_refused_without_connecting(servers, server):
    _, other = servers
    port = server.server_address[1]
    with _client(server) as client:
        with pytest.raises(HttpDenied, match=f"host localhost:{port} is not allowed.*allow-list"):
            client.request("GET", f"http://localhost:{port}/", [], b"")
        with pytest.raises(HttpDenied, match="not allowed"):
            client.request("GET", _url(other, "/"), [], b"")  # right host, other port
        with pytest.raises(HttpDenied, match="not allowed"):
            client.request("GET", f"http://127.0.0.1.example.com:{port}/", [], b"")
        with pytest.raises(HttpDenied, match="credentials"):  # the real host is after the '@'
            client.request("GET", f"http://127.0.0.1:{port}@localhost:{port}/", [], b"")
    assert server.requests == [] and other.requests == []


def test_an_empty_allow_list_means_no_http(server):
    with HttpClient(HttpPolicy()) as client:
        with pytest.raises(HttpDenied, match="disabled"):
            client.request("GET", _url(server, "/"), [], b"")


def test_redirects_are_returned_not_followed(servers, server):
    _, other = servers
    with _client(server) as client:
        response = client.request("GET", _url(server, "/redirect"), [], b"").wait(WAIT)
    assert response.status == 302
    assert dict(response.headers)["Location"] == f"http://127.0.0.1:{other.server_address[1]}/secret"
    assert other.requests == []


@pytest.mark.parametrize("path", ["/slow", "/drip"])  # no answer; an answer too slow as a whole
def test_a_slow_server_times_out(server, path):
    start = time.monotonic()
    with _client(server, timeout_s=0.3) as client:
        pending = client.request("GET", _url(server, path), [], b"")
        with pytest.raises(HttpFailed, match=r"127\.0\.0\.1:\d+ timed out after 0.3 s"):
            pending.wait(WAIT)
    assert time.monotonic() - start < 0.3 * 5 < SLOW_S  # it did not wait for the server to finish


def test_a_request_timeout_is_capped_by_the_policy(server):
    with _client(server, timeout_s=WAIT) as client:
        with pytest.raises(HttpFailed, match="timed out after 0.3 s"):
            client.request("GET", _url(server, "/slow"), [], b"", timeout_s=0.3).wait(WAIT)
    with _client(server, timeout_s=0.3) as client:
        with pytest.raises(HttpFailed, match="timed out after 0.3 s"):
            client.request("GET", _url(server, "/slow"), [], b"", timeout_s=60).wait(WAIT)
        with pytest.raises(HttpDenied, match="timeout_s"):
            client.request("GET", _url(server, "/slow"), [], b"", timeout_s=0)


@pytest.mark.parametrize("path", ["/big", "/big-no-length", "/big-chunked"])  # from the header; while reading
def test_an_oversized_response_fails(server, path):
    with _client(server, max_response_bytes=1000) as client:
        with pytest.raises(HttpFailed, match="over the limit of 1000 bytes"):
            client.request("GET", _url(server, path), [], b"").wait(WAIT)
    with _client(server, max_response_bytes=5000) as client:  # exactly the limit is fine
        assert len(client.request("GET", _url(server, path), [], b"").wait(WAIT).body) == 5000


def test_connection_errors_fail_with_the_host_named():
    with socket.socket() as unused:  # a port that was free a moment ago and that nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with HttpClient(HttpPolicy(allowed_hosts=(f"127.0.0.1:{port}",))) as client:
        with pytest.raises(HttpFailed, match=f"127.0.0.1:{port} failed: ConnectionRefusedError"):
            client.request("GET", f"http://127.0.0.1:{port}/", [], b"").wait(WAIT)


@pytest.mark.parametrize("method,url,headers,body,match", [
    ("GET", "ftp://127.0.0.1/x", [], b"", "scheme 'ftp'"),
    ("GET", "file:///etc/passwd", [], b"", "scheme 'file'"),
    ("GET", "http://127.0.0.1:PORT/a b", [], b"", "spaces or control"),
    ("GET", "http://127.0.0.1:99999/", [], b"", "cannot be parsed"),
    ("GET", "http://user:pw@127.0.0.1:PORT/", [], b"", "credentials"),
    ("TRACE", "http://127.0.0.1:PORT/", [], b"", "method 'TRACE'"),
    ("get", "http://127.0.0.1:PORT/", [], b"", "method 'get'"),
    ("POST", "http://127.0.0.1:PORT/", [], b"x" * 2000, "2000 bytes"),
    ("GET", "http://127.0.0.1:PORT/", [("Host", "evil")], b"", "set by the host"),
    ("GET", "http://127.0.0.1:PORT/", [("X-A", "1\r\nX-B: 2")], b"", "control"),
    ("GET", "http://127.0.0.1:PORT/", [("Bad Name", "1")], b"", "token"),
    ("POST", "http://127.0.0.1:PORT/", [], "text", "must be bytes"),
])
def test_bad_requests_are_refused_at_once(server, method, url, headers, body, match):
    with _client(server, max_request_bytes=1000) as client:
        with pytest.raises(HttpDenied, match=match):
            client.request(method, url.replace("PORT", str(server.server_address[1])), headers, body)
    assert server.requests == []


def test_requests_beyond_the_queue_are_refused_and_close_fails_queued_ones(server):
    client = _client(server, timeout_s=WAIT, max_concurrent=1, max_queued=1)
    running = client.request("GET", _url(server, "/slow?seconds=0.5"), [], b"")
    queued = client.request("GET", _url(server, "/x"), [], b"")
    with pytest.raises(HttpDenied, match="in flight"):
        client.request("GET", _url(server, "/x"), [], b"")
    client.close()
    with pytest.raises(HttpDenied, match="closed"):
        client.request("GET", _url(server, "/x"), [], b"")
    assert running.wait(WAIT).body == b"late"  # a running request is let finish
    with pytest.raises(HttpFailed, match="cancelled"):
        queued.wait(WAIT)
