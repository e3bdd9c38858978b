"""One executor's handler calls, in process: batching forward passes into executor steps
(`batcher`, `prefill_chunks`), who holds which KV page (`page_registry`), the handler calls an
inferlet host makes of a worker (`local_worker`), and the prefix hashes of full pages.

May import: `workers` (the inference layer), `cluster.errors`, `cluster.pending`.
Never imports: wasm (`wasmtime`, `cluster.runtime`), `ray`, or any other part of `cluster`:
a worker serves handler calls from anything that speaks them, sandboxed or not.
"""
