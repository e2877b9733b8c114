"""Cluster mode: several sluice replicas (or `--workers`) sharing one limit per provider.

The shared admission state of each provider lives in Redis, and every decision that
must be global is one atomic Lua script (`scripts.py`) with Redis `TIME` as the one
clock. `hub.py` owns the connection, the pub/sub wake-ups and the up/down state;
`admission.py` is a provider's `Admission` on top of it; `fallback.py` is the local
share a replica enforces while Redis is unreachable.

Nothing here is imported in single-process mode (empty `cluster.redis_url`).
"""
