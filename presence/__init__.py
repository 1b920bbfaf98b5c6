"""Pure presence domain: no sockets, no event loop, no clock of its own.

Everything here takes plain values (and ``now`` in milliseconds where time matters) and
returns plain values, so it can be tested without I/O and property-tested with hypothesis.
"""
