"""Cluster mode: everything that needs Ray or exists only across processes. The Ray actors
(`directory_actor` with the message bus, `worker_actor`, `host_actor`; `cluster` starts them),
the KV-page directory's logic (`kv_directory`, its records and its audit), what the gateways share
through the directory (`host_registry`: hosts, running inferlets, programs), the elastic host pool
(`host_pool`), moving exports between workers (`kv_migration`) and running inferlets
(`inferlet_move`, `page_map`), copying pages between workers (`page_copy`), a host's view of the
cluster (`cluster_host`, `cluster_worker`: placement, global exports, imports), and the gateway
that relays the client API to hosts (`gateway`).

May import: any other part of `cluster`, `workers`, `ray`.
Only `cluster.bench`, `cluster.cli` and `deploy/` import this package (and `ray`).
"""
