"""The inferlet runtime: building Python inferlets into components (`inferlet_build`), the
wasmtime sandbox and its limits (`sandbox`), one scheduler thread driving every inferlet through
wasmtime's async API (`scheduler`, `wasm_async`, with fast value conversion in `wasm_lists`,
`wasm_type_cache`, `wit_values`), one session per inferlet (`session`), the WIT imports
(`imports/`, one module per interface), what the inferlets of a host share (`host_services`),
launching and ending inferlets (`inferlet_host`), and wasmtime's trap handlers kept alive beside
Ray (`fatal_signals`).

May import: `cluster.worker`, `cluster.services`, `cluster.rpc` (a worker or bus in another
process), `cluster.errors`, `cluster.pending`, `workers`, wasmtime.
Never imports: `cluster.api`, `cluster.actors`, `ray`.
"""
