"""The `pie` command line.

    pie build SOURCE.py [-o OUT.wasm]        build an inferlet into a component (cached by content)
    pie run PROGRAM [--model M] [--dtype bf16] [--quant none] [--executor torch] [--allow-http HOST[:PORT]]...
            [-- ARGS...]                     run an inferlet on the embedded engine, printing what it sends
    pie serve [--host 127.0.0.1] [--port 50051] [--model M] [--dtype bf16] [--quant none] [--executor torch]
              [--token T] [--max-running N] [--http-port P [--openai-inferlet PATH]] [--allow-http HOST[:PORT]]...
              [--http-concurrency N] [--ray [--workers N] [--hosts N] [--max-hosts N] [--ray-address ADDR] [--device cpu|cuda]]
                                             serve the client gRPC API until Ctrl-C or SIGTERM
                                             (--port 0: any free port; the token may come from PIE_TOKEN);
                                             --http-port: the OpenAI-compatible HTTP API too, on --host;
                                             --allow-http: hosts inferlets may call over HTTP (none by default);
                                             --quant int8|int4: weight-only quantized linears (CPU kernels);
                                             --executor vllm: vLLM's model code and kernels (`make setup-vllm`,
                                             then .venv-vllm/bin/pie);
                                             --ray: on Ray actors (a local Ray unless --ray-address)
    pie submit --addr HOST:PORT PROGRAM [--token T] [--metadata K=V] [--prompt-hint TEXT] [-- ARGS...]
                                             upload PROGRAM (.py, built here, or .wasm) to a server, run it,
                                             print what it sends; exit 0 if it finished, 1 if it failed,
                                             2 if it could not be submitted
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading

from cluster.errors import InferletError
from workers.errors import WorkerError
from workers.executors import quant_refusal


def _build(opts) -> int:
    from cluster.runtime.inferlet_build import build

    print(build(opts.source, opts.output))
    return 0


def _run(opts) -> int:
    from cluster.runtime.inferlet_host import InferletHost
    from workers.executors import load_executor
    from workers.load_thread import load_on_thread

    # on a thread of its own: see workers/load_thread.py
    executor = load_on_thread(lambda: load_executor(opts.executor, opts.model, dtype=opts.dtype, quant=opts.quant))
    with InferletHost(executor, http_policy=_http_policy(opts)) as host:
        outcome = host.run(opts.program, opts.args, on_message=lambda m: (sys.stdout.write(m), sys.stdout.flush()))
    print()
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return 1
    return 0


def _serve(opts) -> int:
    from cluster.api.grpc_server import DEFAULT_MAX_RUNNING, serve_service

    max_running = opts.max_running or DEFAULT_MAX_RUNNING
    service, what, close = (_ray_service if opts.ray else _embedded_service)(opts, max_running)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stopping.set())
    try:
        http = None
        try:
            server = serve_service(service, opts.port, opts.host, token=opts.token or None)
            if opts.http_port is not None:
                from cluster.api.openai_http import serve_openai

                http = serve_openai(service, opts.host, opts.http_port, opts.token or None, opts.openai_inferlet)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        auth = "a bearer token" if opts.token else "no authentication"
        print(f"pie: serving {what} on {server.target} ({auth})", flush=True)
        if http is not None:
            print(f"pie: serving the OpenAI API on {http.url} ({auth})", flush=True)
        stopping.wait()
        print("pie: stopping", flush=True)
        if http is not None:
            http.stop()
        server.stop(grace=2.0)
    finally:
        close()
    return 0


def _embedded_service(opts, max_running: int):
    """The embedded engine: one executor in this process."""
    from cluster.api.grpc_server import InferletService
    from cluster.runtime.inferlet_host import InferletHost
    from cluster.api.program_store import ProgramStore
    from workers.executors import load_executor
    from workers.load_thread import load_on_thread

    # on a thread of its own: see workers/load_thread.py
    executor = load_on_thread(lambda: load_executor(opts.executor, opts.model, dtype=opts.dtype, quant=opts.quant))
    host = InferletHost(executor, http_policy=_http_policy(opts))
    return InferletService(host, ProgramStore(), max_running), executor.info.name, host.close


def _ray_service(opts, max_running: int):
    """Cluster mode: a local Ray on loopback (or the Ray cluster at --ray-address), its actors, the gateway."""
    import ray

    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster

    local = opts.ray_address is None
    if local:
        init_local_ray()
    else:
        ray.init(address=opts.ray_address)
    spec = ClusterSpec(workers=opts.workers, hosts=opts.hosts, max_hosts=opts.max_hosts, model=opts.model,
                       dtype=opts.dtype,
                       quant=opts.quant, executor=opts.executor, device=opts.device, max_running=max_running,
                       worker_resources={"num_gpus": 1} if opts.device == "cuda" else {},
                       bind_address="127.0.0.1" if local else None, http_policy=_http_policy(opts))
    try:
        cluster = start_cluster(spec)
        model = cluster.directory.model()["info"]["name"]
        return cluster.gateway_service(), f"{model} on {opts.workers} Ray workers, {opts.hosts} hosts", ray.shutdown
    except BaseException:
        ray.shutdown()
        raise


def _submit(opts) -> int:
    from cluster.api.grpc_client import Failed, Finished, Message, PieClient, RequestFailed

    program = opts.program
    try:
        if program.endswith(".py"):
            from cluster.runtime.inferlet_build import build

            program = build(program)
        elif not program.endswith(".wasm"):
            print(f"error: {program}: expected a .py source or a .wasm component", file=sys.stderr)
            return 2
        with PieClient(opts.addr, token=opts.token or None, metadata=opts.metadata) as client:
            program_id = client.upload(program)
            stream = client.launch(program_id, opts.args, prompt_hint=opts.prompt_hint)
            try:
                for event in stream:
                    if isinstance(event, Message):
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                    elif isinstance(event, Finished):
                        print()
                        return 0
                    elif isinstance(event, Failed):
                        print()
                        print(f"error: the inferlet failed: {event.error}", file=sys.stderr)
                        return 1
            except KeyboardInterrupt:
                stream.cancel(terminate=True)  # Terminate first: a Ray Serve proxy may not pass a cancel on
                print("\npie: interrupted; the inferlet was stopped", file=sys.stderr)
                return 130
    except (RequestFailed, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"error: the server at {opts.addr} ended the stream without saying how the inferlet ended",
          file=sys.stderr)
    return 2


def _http_policy(opts):
    """The hosts' HTTP policy from --allow-http and --http-concurrency."""
    from cluster.services.http_client import HttpPolicy

    policy = HttpPolicy(allowed_hosts=tuple(opts.allow_http))
    if getattr(opts, "http_concurrency", None):
        policy = dataclasses.replace(policy, max_concurrent=opts.http_concurrency)
    return policy


def _allowed_host(text: str) -> str:
    from cluster.services.http_client import check_allowed_hosts

    try:
        check_allowed_hosts([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_http_options(parser, concurrency: bool = True) -> None:
    parser.add_argument("--allow-http", action="append", default=[], metavar="HOST[:PORT]", type=_allowed_host,
                        help="a host inferlets may send HTTP requests to (repeatable; default: none, no HTTP at all)")
    if concurrency:
        parser.add_argument("--http-concurrency", type=_positive_int, default=None,
                            help="inferlets' HTTP requests running at once per host; more wait their turn (default 64)")


def _add_quant_option(parser) -> None:
    parser.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                        help="the linear layers' weights: none (as --dtype), or int8 / int4 weight-only "
                             "quantized, run by CPU kernels compiled on first use (default: none)")


def _add_executor_option(parser) -> None:
    from workers.executors import EXECUTORS

    parser.add_argument("--executor", default="torch", choices=EXECUTORS,
                        help="torch: our model code (default); vllm: vLLM's model code and kernels "
                             "(needs `make setup-vllm`, run from .venv-vllm)")


def _metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip().lower(), value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pie", description="Build, run and serve inferlets.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an inferlet's Python source into a WebAssembly component")
    b.add_argument("source")
    b.add_argument("-o", "--output", default=None, help="where to write the .wasm (default: print the cached path)")
    r = sub.add_parser("run", help="run an inferlet (.py or .wasm) on the embedded engine")
    r.add_argument("program")
    r.add_argument("--model", default=None, help="a .gguf file, a model directory or a hub id (default: SmolLM2)")
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    _add_quant_option(r)
    _add_executor_option(r)
    _add_http_options(r)
    s = sub.add_parser("serve", help="serve the client gRPC API on the embedded engine, or a Ray cluster (--ray)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one")
    s.add_argument("--model", default=None, help="a .gguf file, a model directory or a hub id (default: SmolLM2)")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    _add_quant_option(s)
    _add_executor_option(s)
    s.add_argument("--token", default=os.environ.get("PIE_TOKEN"),
                   help="require `authorization: Bearer TOKEN` on every call (default: $PIE_TOKEN)")
    s.add_argument("--max-running", type=_positive_int, default=None, help="inferlets running at once (default: 224)")
    s.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/...) on this port of --host; 0: any free one")
    s.add_argument("--openai-inferlet", default=None, metavar="PATH",
                   help="with --http-port: the inferlet (.py or .wasm) serving each request "
                        "(default: inferlets/builtin/openai_server.py)")
    _add_http_options(s)
    s.add_argument("--ray", action="store_true", help="cluster mode: workers, hosts and the directory as Ray actors")
    s.add_argument("--workers", type=_positive_int, default=2, help="with --ray: worker actors (one per GPU)")
    s.add_argument("--hosts", type=_positive_int, default=1, help="with --ray: inferlet host actors")
    s.add_argument("--max-hosts", type=_positive_int, default=None,
                   help="with --ray: an elastic host pool, from --hosts up to this many (added when busy, "
                        "removed when idle)")
    s.add_argument("--ray-address", default=None,
                   help="with --ray: join this Ray cluster (e.g. auto); default: start a local one on loopback")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="with --ray: where workers run the model (cuda: each worker asks Ray for one GPU)")
    m = sub.add_parser("submit", help="run an inferlet on a pie server, printing what it sends")
    m.add_argument("--addr", required=True, help="the server, HOST:PORT")
    m.add_argument("program", help="a .py source (built here, cached) or a .wasm component")
    m.add_argument("--token", default=os.environ.get("PIE_TOKEN"), help="the server's token (default: $PIE_TOKEN)")
    m.add_argument("--metadata", type=_metadata, action="append", default=[], metavar="KEY=VALUE",
                   help="gRPC metadata for every call, e.g. application=pie for a Ray Serve proxy serving several apps")
    m.add_argument("--prompt-hint", default="",
                   help="text the inferlet's context starts with: a cluster places it beside a cached prefix")
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after the first "--" belongs to the inferlet
    split = argv.index("--") if "--" in argv else len(argv)
    opts = ap.parse_args(argv[:split])
    opts.args = argv[split + 1:]
    why = quant_refusal(getattr(opts, "executor", "torch"), getattr(opts, "quant", "none"))
    if why:
        ap.error(f"--quant {opts.quant} {why}")
    if getattr(opts, "max_hosts", None) is not None and opts.max_hosts < opts.hosts:
        ap.error(f"--max-hosts {opts.max_hosts} is under --hosts {opts.hosts}: the pool never has fewer than --hosts")
    try:
        return {"build": _build, "run": _run, "serve": _serve, "submit": _submit}[opts.command](opts)
    except (InferletError, WorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
