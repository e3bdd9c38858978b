"""The cluster's client API as a Ray Serve application with gRPC ingress.

    serve run deploy/config.yaml                   # from the repository root: Ray, Serve, the app
    serve deploy deploy/config.yaml                # onto a running Ray cluster (`ray up deploy/cluster.yaml`)

Serve's gRPC proxy (port `grpc_options.port` of the config, 9000 by default) serves pie.v1.Inferlets
(cluster/proto/pie.proto) and routes each call to this application by the call's metadata
`application: <name>` (the config names it `pie`): `PieClient(addr, metadata=(("application", "pie"),))`.

Each replica of the deployment starts the cluster's actors through cluster.actors.cluster.start_cluster
(or finds them by name: the directory `pie-directory`, workers `pie-worker-<i>`, hosts `pie-host-<i>`,
namespace `pie`) and answers every call with the same GatewayService that `pie serve --ray` runs. Only
the calling convention differs, and `ServeGateway` adapts it:

- Serve calls a method with the request (or, for the client-streaming Upload, an async iterator of
  chunks) and a RayServegRPCContext, which has set_code/set_details but no abort() and no
  add_callback(). `ServeContext` provides both: abort sets the status and raises, and Serve sends
  that status and message to the client; callbacks run when the call ends however it ends.
- A client that cancels Launch (or goes away) reaches the replica as asyncio cancellation of the
  async generator: Serve cancels the call's task, `await` raises CancelledError, and the callbacks
  GatewayService registered stop the inferlet, which releases its pages. (A plain generator would
  never learn of it: Serve runs it on a thread to its end.) Each Launch's blocking generator runs on
  a thread of its own for the inferlet's life. Serve 2.60's proxy passes the cancellation on only
  when it finds the proxy awaiting the replica's next event; when it lands while the proxy writes an
  event to the client, the replica never hears of it (measured: 3 of 12 cancels). Clients stop an
  inferlet with Terminate as well (PieClient: `stream.cancel(terminate=True)`).

`serve run` from the repository root finds this module; for `serve deploy`, Ray must run with the
repository on PYTHONPATH on every node (deploy/cluster.yaml does it): the package does not include it.

Any number of replicas (`num_replicas`, or Serve's `autoscaling_config`): a replica keeps nothing
another needs. Uploaded programs and the table of live inferlets are in the directory actor, so any
replica answers Send, Terminate, List and Attach for any other's inferlets and launches what another
was sent. A replica that dies costs only the Launch streams it was relaying: the inferlets run on
(on their hosts, for a grace period) and their clients re-attach through another replica
(`PieClient.resume`). The actors are detached from the replica that started them (Ray would end
them with it otherwise): deleting the application leaves them running; end them with `ray stop`
(or `ray.kill` each actor of the namespace `pie`: `ray list actors` names them).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
from ray import serve

from cluster.actors.cluster import ClusterSpec, start_cluster
from cluster.rpc.grpc_auth import BearerTokenAuth
from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, UNARY_THREADS
from cluster.api.openai_http import OpenAIFrontend, respond
from cluster.services.http_client import HttpPolicy, check_allowed_hosts
from cluster.proto import pie_pb2
from workers.executors import EXECUTORS, quant_refusal
from workers.torch_executor import QUANTS

log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log (logs/serve/replica_*.log)

APP_NAME = "pie"  # the application name clients put in their `application` metadata
SERVICER = "cluster.proto.pie_pb2_grpc.add_InferletsServicer_to_server"  # grpc_options.grpc_servicer_functions
RELAY_EVENTS = 64  # a Launch's events between its pump thread and the replica's stream
UPLOAD_THREADS = 4  # uploads compiled at once (each holds a thread while it reads chunks and compiles)


class _RelayClosed(Exception):
    """The Launch stream a pump feeds has ended."""


class CallAborted(Exception):
    """ServeContext.abort: the status is set on Serve's context; Serve sends it with the details."""


class ServeContext:
    """A grpc.ServicerContext face on Serve's RayServegRPCContext, for GatewayService's methods."""

    def __init__(self, serve_context):
        self._serve = serve_context
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []  # None once the call has ended

    def abort(self, code: grpc.StatusCode, details: str):
        self._serve.set_code(code)
        self._serve.set_details(details)
        raise CallAborted(f"{code.name}: {details}")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends; False (and not run) when it has ended already."""
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def ended(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks or [], None
        for callback in callbacks:
            callback()

    def invocation_metadata(self):
        return self._serve.invocation_metadata()

    def __getattr__(self, name: str):  # peer(), set_trailing_metadata(), ...
        return getattr(self._serve, name)


@dataclasses.dataclass(frozen=True)
class AppArgs:
    """The application's `args` in the Serve config."""
    workers: int = 1  # worker actors: one per GPU (device cuda), or CPU workers
    hosts: int = 1  # inferlet host actors (the least an elastic pool keeps)
    max_hosts: int | None = None  # above hosts: an elastic pool, hosts added when busy up to this many; null: fixed
    host_idle_s: float = 30.0  # an elastic pool removes a host it added once idle this long
    model: str | None = None  # a .gguf file, a model directory or a hub id, on every worker node (default SmolLM2)
    dtype: str = "bf16"  # bf16 or fp32
    quant: str = "none"  # none, int8 or int4: the linear layers' weights quantized (CPU kernels only)
    executor: str = "torch"  # torch (our model code) or vllm (vLLM's; needs vLLM installed on every worker node)
    device: str = "cpu"  # cpu, or cuda: each worker asks Ray for one GPU (num_gpus: 1)
    num_pages: int | None = None  # KV pages per worker (default: the executor's budget)
    page_size: int = 16
    torch_threads: int | None = None  # per CPU worker (default: the node's cores shared among its workers)
    max_running: int = DEFAULT_MAX_RUNNING  # inferlets running at once, at the gateway and per host
    # where workers and hosts listen: null = each node's address (multi-node); "127.0.0.1" on one machine.
    # Their services require the cluster's internal token, sent in clear text: keep the nodes on a private network
    bind_address: str | None = None
    # callers must send `authorization: Bearer <token>`; null: the replica's PIE_TOKEN if set (give it
    # through runtime_env.env_vars rather than writing a token into the config), else no authentication
    token: str | None = None
    # the inferlet serving each OpenAI API request on Serve's HTTP proxy (a .py or .wasm path on the
    # replica's node); null: the built-in inferlets/builtin/openai_server.py
    openai_inferlet: str | None = None
    # hosts inferlets may call over HTTP ("host" or "host:port"); empty: no HTTP at all
    allow_http: tuple[str, ...] = ()
    http_concurrency: int = HttpPolicy.max_concurrent  # inferlets' HTTP requests at once per host; more wait

    def spec(self) -> ClusterSpec:
        return ClusterSpec(detached=True, workers=self.workers, hosts=self.hosts, max_hosts=self.max_hosts,
                           host_idle_s=self.host_idle_s, model=self.model, dtype=self.dtype,
                           quant=self.quant, executor=self.executor, device=self.device, num_pages=self.num_pages,
                           page_size=self.page_size, torch_threads=self.torch_threads, max_running=self.max_running,
                           worker_resources={"num_gpus": 1} if self.device == "cuda" else {},
                           bind_address=self.bind_address,
                           http_policy=HttpPolicy(allowed_hosts=tuple(self.allow_http),
                                                  max_concurrent=self.http_concurrency))

    @classmethod
    def parse(cls, args: dict | None) -> "AppArgs":
        """From the config's `args`, refusing what would otherwise be silently ignored or fail later."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"deploy/app.py: unknown application args {unknown}; the args are {sorted(known)}")
        if isinstance(args.get("allow_http"), str) or not isinstance(args.get("allow_http", ()), (list, tuple)):
            raise ValueError(f"deploy/app.py: args.allow_http must be a list of 'host' or 'host:port' entries, "
                             f"not {args.get('allow_http')!r}")
        args["allow_http"] = tuple(args.get("allow_http", ()))
        check_allowed_hosts(args["allow_http"])
        parsed = cls(**args)
        for name in ("workers", "hosts", "max_running", "page_size", "http_concurrency"):
            value = getattr(parsed, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"deploy/app.py: args.{name} must be a positive integer, not {value!r}")
        if parsed.max_hosts is not None and (not isinstance(parsed.max_hosts, int) or parsed.max_hosts < parsed.hosts):
            raise ValueError(f"deploy/app.py: args.max_hosts must be null or an integer of at least hosts "
                             f"({parsed.hosts}), not {parsed.max_hosts!r}")
        if not isinstance(parsed.host_idle_s, (int, float)) or not parsed.host_idle_s > 0:
            raise ValueError(f"deploy/app.py: args.host_idle_s must be a positive number of seconds, "
                             f"not {parsed.host_idle_s!r}")
        if parsed.dtype not in ("bf16", "fp32"):
            raise ValueError(f"deploy/app.py: args.dtype must be bf16 or fp32, not {parsed.dtype!r}")
        if parsed.quant not in QUANTS:
            raise ValueError(f"deploy/app.py: args.quant must be none, int8 or int4, not {parsed.quant!r}")
        if parsed.executor not in EXECUTORS:
            raise ValueError(f"deploy/app.py: args.executor must be {' or '.join(EXECUTORS)}, "
                             f"not {parsed.executor!r}")
        why = quant_refusal(parsed.executor, parsed.quant)
        if why:
            raise ValueError(f"deploy/app.py: args.quant {parsed.quant} {why}")
        if parsed.device not in ("cpu", "cuda"):
            raise ValueError(f"deploy/app.py: args.device must be cpu or cuda, not {parsed.device!r}")
        return parsed


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class ServeGateway:
    """One replica: the cluster's gateway. Method names are pie.v1.Inferlets' RPC names."""

    def __init__(self, args: AppArgs):
        self.cluster = start_cluster(args.spec())  # blocks until every worker has loaded the model
        self.service = self.cluster.gateway_service()
        token = args.token or os.environ.get("PIE_TOKEN") or None
        self._auth = BearerTokenAuth(token) if token else None
        self._upload_pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="pie-upload")
        self.openai = OpenAIFrontend(self.service, args.openai_inferlet, token)  # builds the inferlet once (cached)

    async def __call__(self, request):
        """Serve's HTTP proxy: the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions
        under the application's route_prefix), the same routes as `pie serve --http-port`."""
        return await respond(self.openai, request)

    def _context(self, grpc_context) -> ServeContext:
        context = ServeContext(grpc_context)
        refusal = self._auth and self._auth.refusal(grpc_context.invocation_metadata())
        if refusal:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        return context

    async def Upload(self, request_stream: AsyncIterator[pie_pb2.UploadChunk], grpc_context) -> pie_pb2.ProgramRef:
        context = self._context(grpc_context)
        loop = asyncio.get_running_loop()

        def chunks() -> Iterator[pie_pb2.UploadChunk]:  # on the upload thread, one chunk at a time
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(anext(request_stream), loop).result()
                except StopAsyncIteration:
                    break
            if getattr(request_stream, "is_cancelled", lambda: False)():
                context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the upload before its last chunk")

        return await loop.run_in_executor(self._upload_pool, self.service.Upload, chunks(), context)

    async def Launch(self, request: pie_pb2.LaunchRequest, grpc_context) -> AsyncIterator[pie_pb2.Event]:
        async for event in self._relayed(self.service.Launch, request, grpc_context, "Launch"):
            yield event

    async def _relayed(self, call, request, grpc_context, name: str) -> AsyncIterator[pie_pb2.Event]:
        """A server-streaming call of the service, its blocking generator pumped on a thread of its own."""
        context = self._context(grpc_context)
        loop = asyncio.get_running_loop()
        # bounded: when the client reads slowly the pump waits, the service's generator is not
        # pulled, and the inferlet's outbox fills until its send waits (nothing grows unbounded)
        events: asyncio.Queue = asyncio.Queue(maxsize=RELAY_EVENTS)
        end, closed = object(), threading.Event()

        def put(item: Any) -> None:
            if closed.is_set():
                raise _RelayClosed()
            try:
                asyncio.run_coroutine_threadsafe(events.put(item), loop).result()
            except RuntimeError:
                raise _RelayClosed() from None  # the replica's loop has closed: it is shutting down

        def pump() -> None:  # the blocking generator, for the inferlet's life
            try:
                for event in call(request, context):
                    put(event)
                put(end)
            except _RelayClosed:
                pass
            except BaseException as e:
                try:
                    put(e)
                except _RelayClosed:
                    pass

        threading.Thread(target=pump, name="pie-launch", daemon=True).start()
        try:
            while (item := await events.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        except asyncio.CancelledError:
            log.info("%s: the client cancelled the call or went away", name)
            raise
        finally:  # finished, failed, or cancelled by the client: stop the inferlet if it still runs
            closed.set()
            while not events.empty():  # a pump waiting for room gets it, then sees `closed`
                events.get_nowait()
            context.ended()

    def Send(self, request: pie_pb2.SendRequest, grpc_context) -> pie_pb2.Empty:
        return self.service.Send(request, self._context(grpc_context))

    def Terminate(self, request: pie_pb2.TerminateRequest, grpc_context) -> pie_pb2.Empty:
        return self.service.Terminate(request, self._context(grpc_context))

    def List(self, request: pie_pb2.Empty, grpc_context) -> pie_pb2.InferletList:
        return self.service.List(request, self._context(grpc_context))

    async def Attach(self, request: pie_pb2.AttachRequest, grpc_context) -> AsyncIterator[pie_pb2.Event]:
        """As Launch, with one difference: cancelling it leaves the inferlet running (its host waits for
        the next Attach)."""
        async for event in self._relayed(self.service.Attach, request, grpc_context, "Attach"):
            yield event

    def Health(self, request: pie_pb2.Empty, grpc_context) -> pie_pb2.HealthReply:
        return self.service.Health(request, self._context(grpc_context))


def app_builder(args: dict | None = None) -> serve.Application:
    """The application for `import_path: deploy.app:app_builder` and its `args` (AppArgs' fields)."""
    return application(AppArgs.parse(args))


def application(args: AppArgs, **options) -> serve.Application:
    """The application for parsed args, with ServeGateway's deployment `options` (num_replicas, ...)."""
    # every Launch stream is an ongoing request for its inferlet's life, beside the unary calls
    return ServeGateway.options(max_ongoing_requests=args.spec().gateway_max_running + UNARY_THREADS,
                                **options).bind(args)
