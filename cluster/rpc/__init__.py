"""Handler calls between processes: the msgpack codec of calls and replies (`handler_codec`),
gRPC frames (`frames`), both ends of a handler-call stream (`call_stream`), a worker served to
hosts in other processes (`worker_service`) and its client (`remote_worker`), the cluster's
message bus served the same way (`bus_service`), and bearer-token auth for every gRPC server of
ours (`grpc_auth`: the client API's and the cluster's internal services).

May import: `cluster.worker`, `cluster.services`, `cluster.proto`, `cluster.errors`,
`cluster.pending`, `workers`, grpc.
Never imports: wasm (`wasmtime`, `cluster.runtime`), `cluster.api`, `cluster.actors`, `ray`.
"""
