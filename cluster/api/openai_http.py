"""The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, streaming (server-sent events) or not.

Each request runs the built-in inferlet (inferlets/builtin/openai_server.py, or the deployment's
own with `--openai-inferlet`), launched through the same InferletService as the gRPC API's
launches: in embedded mode on the one host, in cluster mode through the gateway. So it is batched
with every other inferlet, sandboxed and limited the same way, and counts against the same
`max_running`. The inferlet's messages are JSON events (openai_events.py turns them into OpenAI's
objects); a client that disconnects stops its inferlet, which gives its pages back.

The prefix cache is scoped by program and tenant: the tenant is a hash of the API key the client
sent, so requests under one key reuse each other's KV and never another key's.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from cluster.api import status
from cluster.api.grpc_server import InferletService, TokenLatency, status_of
from cluster.api.openai_events import ChoiceStreams, InferletFailure, completion_object
from cluster.api.openai_requests import ApiError, Job, parse
from cluster.errors import InferletError
from cluster.runtime.inferlet_build import INFERLETS_DIR, build
from cluster.runtime.inferlet_host import Outcome
from cluster.runtime.outbox import Outbox

log = logging.getLogger("pie.openai")

BUILTIN_INFERLET = INFERLETS_DIR / "builtin" / "openai_server.py"
MAX_BODY_BYTES = 4 << 20  # a request body past this is refused 413
MAX_TOKENS_LIMIT = 1 << 15  # the inferlet caps max_tokens at what the context has room for
# gRPC status name -> HTTP status (anything else: 500)
_HTTP_OF = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404,
            "UNAUTHENTICATED": 401}


def tenant_of(authorization: str | None) -> str:
    """A stable, non-reversible name for the API key a request carries ('' without one)."""
    if not authorization:
        return ""
    return hashlib.sha256(authorization.encode()).hexdigest()[:32]


class _Sink(Outbox):
    """One request's events, put on any thread and read on the request's event loop; bounded as a
    gRPC client's are (the service's outbox bounds): past them the inferlet's `send` waits until the
    HTTP client has taken enough, so a client that reads slowly or not at all grows nothing."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bounds: tuple[int, int]):
        super().__init__(*bounds, on_item=self._wake)
        self.loop = loop
        self._ready = asyncio.Event()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            pass  # the server's loop has closed (it is stopping): nobody reads this request any more

    async def next(self):
        """The next event, waiting on the loop (not on a thread) for one."""
        while True:
            self._ready.clear()  # before looking: an item put after the look sets it again
            try:
                return self.get(timeout=0)
            except TimeoutError:
                await self._ready.wait()


class OpenAIFrontend:
    """The routes over one InferletService. `program`: the inferlet serving each request."""

    def __init__(self, service: InferletService, program: str | Path | None = None, token: str | None = None):
        self.service = service
        self.token = token
        self.model = service.model_name()
        program = Path(program or BUILTIN_INFERLET)
        wasm = program if program.suffix == ".wasm" else build(program)  # built once, cached by content
        self.program_id = service.add_program(wasm.read_bytes())
        self.created = int(time.time())
        status.watch(service)

    # -- the routes ------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "pie-cluster"}]}

    def check_auth(self, authorization: str | None) -> None:
        if self.token is None:
            return
        expected = f"Bearer {self.token}"
        if not authorization or not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key")

    def job(self, raw: bytes, chat: bool) -> Job:
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        return parse(body, chat, self.model, MAX_TOKENS_LIMIT)

    def start(self, job: Job, authorization: str | None, sink: _Sink):
        """Launch the inferlet for `job`; its RunningInferlet. Refusals become ApiError."""
        try:
            return self.service.start(self.program_id, [job.argument()], sink, tenant=tenant_of(authorization))
        except InferletError as e:
            status = _HTTP_OF.get(status_of(e).name, 500)
            raise ApiError(status, str(e), kind="server_error" if status >= 500 else
                           "rate_limit_exceeded" if status == 429 else "invalid_request_error") from None

    async def events(self, job: Job, authorization: str | None):
        """The inferlet's events for `job` as parsed JSON objects, ending with its Outcome; the
        inferlet is stopped if the caller stops iterating (a client that went away)."""
        sink = _Sink(asyncio.get_running_loop(), self.service.outbox_bounds())
        # off the event loop: a cluster gateway's launch waits for a host (and uploads the program once)
        launch = asyncio.ensure_future(asyncio.to_thread(self.start, job, authorization, sink))
        try:
            running = await asyncio.shield(launch)
        except asyncio.CancelledError:  # the client went away during the launch: stop what it starts
            launch.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                     or f.result().stop("its HTTP client went away"))
            raise
        ended = False
        try:
            while True:
                item = await sink.next()
                if isinstance(item, Outcome):
                    ended = True
                    yield item
                    return
                try:
                    yield json.loads(item)
                except ValueError:
                    raise InferletFailure(f"the OpenAI inferlet sent a message that is not JSON: {item[:80]!r}")
        finally:
            if not ended:
                running.stop("its HTTP client went away")

    async def complete(self, job: Job, authorization: str | None) -> dict:
        streams = ChoiceStreams(job)
        async for event in self.events(job, authorization):
            streams.take(event)
        return completion_object(job, streams, self.model)

    async def stream(self, job: Job, authorization: str | None):
        """Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."""
        streams = ChoiceStreams(job)
        latency = TokenLatency("openai")
        try:
            async for event in self.events(job, authorization):
                for chunk in streams.take(event, self.model):
                    if any(c.get("text") or c.get("delta", {}).get("content") for c in chunk["choices"]):
                        latency.message()
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
            if job.include_usage:
                yield f"data: {json.dumps(streams.usage_chunk(self.model), separators=(',', ':'))}\n\n"
        except (ApiError, InferletFailure) as e:  # after the first byte there is no status to change
            error = e if isinstance(e, ApiError) else ApiError(500, str(e), kind="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"


async def respond(frontend: OpenAIFrontend, request):
    """The answer to one HTTP request (a Starlette Request) as a Starlette Response: the routes,
    shared by the embedded server (build_app) and Ray Serve's HTTP proxy (deploy/app.py)."""
    from starlette.responses import JSONResponse, StreamingResponse

    root, path = request.scope.get("root_path", ""), request.url.path
    if root and path.startswith(root):  # behind Serve's route prefix
        path = path[len(root):]
    authorization = request.headers.get("authorization")
    try:
        if request.method == "GET" and path.rstrip("/") in _STATUS_ROUTES:
            return _status_route(frontend, path.rstrip("/"), authorization)
        route = _ROUTES.get((request.method, path.rstrip("/")))
        if route is None:
            raise ApiError(404, f"no route {request.method} {path}; this server serves GET /v1/models, "
                                f"POST /v1/completions, POST /v1/chat/completions, GET /metrics, GET /status.json "
                                f"and its status page at GET /")
        frontend.check_auth(authorization)
        if route == "models":
            return JSONResponse(frontend.models())
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}")
        job = frontend.job(await request.body(), chat=route == "chat")
        if not job.stream:
            return JSONResponse(await frontend.complete(job, authorization))
        chunks = frontend.stream(job, authorization)
        first = await anext(chunks)  # a refusal at launch still gets its status
        return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    except ApiError as e:
        return JSONResponse(e.body(), status_code=e.status)
    except InferletFailure as e:
        error = ApiError(500, str(e), kind="server_error")
        return JSONResponse(error.body(), status_code=error.status)


_ROUTES = {("GET", "/v1/models"): "models", ("POST", "/v1/completions"): "completion",
           ("POST", "/v1/chat/completions"): "chat"}
_STATUS_ROUTES = ("", "/metrics", "/status.json")
STATUS_PAGE = Path(__file__).with_name("status_page.html")


def _status_route(frontend: OpenAIFrontend, path: str, authorization: str | None):
    """The status page (no data of its own: it fetches /status.json with ?token=), the status and
    Prometheus's metrics (both behind the token, as the API is)."""
    from starlette.responses import HTMLResponse, JSONResponse, Response

    if path == "":
        return HTMLResponse(STATUS_PAGE.read_text())
    frontend.check_auth(authorization)
    if path == "/metrics":
        return Response(status.metrics_text(frontend.service), media_type=CONTENT_TYPE_LATEST)
    return JSONResponse(status.status(frontend.service, frontend.created))


def build_app(frontend: OpenAIFrontend):
    """An ASGI application serving the routes (for uvicorn)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def endpoint(request):
        return await respond(frontend, request)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])


async def _prepend(first: str, rest):
    yield first
    async for item in rest:
        yield item


class HttpServer:
    """uvicorn serving an app on address:port in a thread of its own; `port` is the bound one."""

    def __init__(self, app, address: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self._socket = socket.create_server((address, port))
        self.address, self.port = address, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="pie-openai-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {address}:{self.port} did not start")
            time.sleep(0.01)
        log.info("serving the OpenAI API on http://%s:%d/v1", address, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


def serve_openai(service: InferletService, address: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 program: str | Path | None = None) -> HttpServer:
    """Serve the OpenAI API for `service` on address:port (0: any free port) until stop()."""
    return HttpServer(build_app(OpenAIFrontend(service, program, token)), address, port)
