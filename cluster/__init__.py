"""The control plane: hosting inferlets, batching their handler calls, serving them, and Ray.

One subpackage per job; each `__init__` says what it may import. From the bottom up:

- `errors`, `pending`: the error taxonomy and the result-that-arrives-later every layer shares.
- `worker/`: one executor's handler calls (batching, prefill chunks, page ownership). No wasm.
- `services/`: what a host's inferlets share (messaging, HTTP, grammars, timers). No wasm.
- `rpc/`: handler calls between processes (codec, frames, call streams, remote worker and bus).
- `runtime/`: the wasm sandboxes, the scheduler, the WIT imports, building inferlets.
- `api/`: the client APIs (gRPC service and client, program store).
- `actors/`: everything cluster mode and Ray: actors, directory, cluster host and worker, gateway.
- `bench/`: benchmarks; `cli` (`pie`); `proto/`: the .proto files and their generated code.

`tests/test_import_rules.py` holds these rules.
"""
