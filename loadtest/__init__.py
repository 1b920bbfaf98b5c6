"""Load tests and benchmarks of the presence gateway.

- ``locustfile.py``: Locust scenarios (steady, season, surge, storm); gevent only.
- ``acceptance``: one command running the gateway and Locust, checking propagation p95.
- ``bench``: the asyncio benchmark driver (connections, memory, connect rate,
  propagation, fan-out against bare websockets, Redis Cluster, python-socketio peer).

Nothing in the gateway imports this package. The locustfile must stay free of asyncio,
uvloop and redis imports (``import locust`` monkey-patches the standard library with
gevent), so it imports nothing from this package but what is gevent-safe.
"""
