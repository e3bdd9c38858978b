"""Benchmarks, each run as `python -m cluster.bench.NAME`; each prints its figures beside a peer
measured in the same run (the plain decode loop, or embedded mode): `host` (launch latency and
the host's cost per step), `tax` (inferlets against the plain batched decode loop), `cluster`
(cluster mode against embedded), `codec` (the handler-call codec), `openai` (the OpenAI API against
the gRPC inferlet and the plain loop), `agentic` (agent workloads as inferlets against a client loop
over an OpenAI API). Shared helpers in `common`.

May import anything in `cluster` and `workers`, and `ray`. Nothing imports this package.
"""
