"""Parsing py-spy's collapsed stacks into the top functions (``loadtest/profiling.py``)."""

from __future__ import annotations

from loadtest import profiling

MOD = "<module> (gateway/cli.py:1)"
RUN = "run (/usr/lib/python3.11/asyncio/runners.py:86)"
FLUSH = "_flush (gateway/hub.py:40)"
SEND = "send_data (/x/.venv-load/lib/python3.11/site-packages/websockets/protocol.py:500)"
RAW = "\n".join([f"{MOD};{RUN};{FLUSH} 60", f"{MOD};{RUN};{FLUSH};{SEND} 30",
                 f"{MOD};encode (presence/codec.py:10) 10", "garbage line", ""])


def test_parse_collapsed_counts_each_stack() -> None:
    stacks = profiling.parse_collapsed(RAW)
    assert sum(stacks.values()) == 100
    assert stacks[("<module> (gateway/cli.py:1)", "encode (presence/codec.py:10)")] == 10


def test_top_functions_by_own_and_total_samples() -> None:
    top = profiling.top_functions(profiling.parse_collapsed(RAW), n=3)
    assert top["samples"] == 100
    assert top["own"] == [("_flush (gateway/hub.py:40)", 60),
                          ("send_data (websockets/protocol.py:500)", 30),
                          ("encode (presence/codec.py:10)", 10)]
    assert top["trunk"] == ["<module> (gateway/cli.py:1)"]
    assert top["total"][:2] == [("_flush (gateway/hub.py:40)", 90),
                                ("run (asyncio/runners.py:86)", 90)]


def test_a_recursive_frame_counts_once_per_stack() -> None:
    stacks = profiling.parse_collapsed("f (a.py:1);f (a.py:1);g (a.py:5) 7\n")
    top = profiling.top_functions(stacks)
    assert top["trunk"] == ["f (a.py:1)", "g (a.py:5)"] and top["total"] == []
    assert dict(top["own"]) == {"g (a.py:5)": 7}


def test_format_top_gives_shares() -> None:
    lines = profiling.format_top(profiling.top_functions(profiling.parse_collapsed(RAW), n=1))
    assert lines[0] == "  top 1 functions by own samples (of 100 samples):"
    assert lines[1].split() == ["60.0", "%", "60", "_flush", "(gateway/hub.py:40)"]


def test_is_gateway() -> None:
    assert profiling.is_gateway(["/x/.venv-load/bin/presence", "serve", "--port", "1"])
    assert not profiling.is_gateway(["python", "-m", "loadtest.bare_server", "--port", "1"])
