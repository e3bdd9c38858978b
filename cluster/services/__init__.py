"""The services a host's inferlets share, beside the worker: messaging between inferlets
(topics, queues, a key-value store), outbound HTTP under an allow-list, grammar matchers for
constrained decoding, and timers (sleeps, timeouts).

May import: `workers` (the tokenizer), `cluster.errors`, `cluster.pending`, each other.
Never imports: wasm (`wasmtime`, `cluster.runtime`), `ray`, `cluster.worker`, `cluster.rpc` and
above: a service knows nothing of who calls it.
"""
