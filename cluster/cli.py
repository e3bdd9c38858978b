"""The `pie` command line.

    pie build SOURCE.py [-o OUT.wasm]        build an inferlet into a component (cached by content)
    pie run PROGRAM [--model M] [-- ARGS...]   run an inferlet on the embedded engine, printing what it sends
"""
from __future__ import annotations

import argparse
import sys

from cluster.errors import InferletError
from workers.errors import WorkerError


def _build(opts) -> int:
    from cluster.inferlet_build import build

    print(build(opts.source, opts.output))
    return 0


def _run(opts) -> int:
    from cluster.inferlet_host import InferletHost
    from workers.torch_executor import TorchExecutor

    executor = TorchExecutor.load(opts.model, dtype=opts.dtype)
    with InferletHost(executor) as host:
        outcome = host.run(opts.program, opts.args, on_message=lambda m: (sys.stdout.write(m), sys.stdout.flush()))
    print()
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pie", description="Build and run inferlets.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an inferlet's Python source into a WebAssembly component")
    b.add_argument("source")
    b.add_argument("-o", "--output", default=None, help="where to write the .wasm (default: print the cached path)")
    r = sub.add_parser("run", help="run an inferlet (.py or .wasm) on the embedded engine")
    r.add_argument("program")
    r.add_argument("--model", default=None, help="a .gguf file, a model directory or a hub id (default: SmolLM2)")
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after the first "--" belongs to the inferlet
    split = argv.index("--") if "--" in argv else len(argv)
    opts = ap.parse_args(argv[:split])
    opts.args = argv[split + 1:]
    try:
        return {"build": _build, "run": _run}[opts.command](opts)
    except (InferletError, WorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
