"""Cluster mode's Ray actors: the KV-page directory, GPU workers, inferlet hosts (see cluster/actors/cluster.py)."""
