"""Backends behind two small ports, :class:`cluster.base.Broker` and
:class:`cluster.base.Store`: in-memory (one process, the embedded default) and Redis."""
