"""The client APIs: the pie.v1.Inferlets gRPC service over an inferlet host (`grpc_server`),
its client library (`grpc_client`, also `pie submit`'s), and the store of uploaded programs
(`program_store`).

May import: `cluster.runtime`, `cluster.rpc`, `cluster.services`, `cluster.worker`,
`cluster.proto`, `cluster.errors`, `cluster.pending`, `workers`, grpc.
Never imports: `cluster.actors`, `ray`: the same API serves embedded mode and, through the
gateway, cluster mode.
"""
