"""``asyncapy send`` never prints a control or bidirectional formatting character raw.

A real server on loopback replies with strings full of them (U+202E, U+009B CSI,
U+0085 NEL, ESC, BEL, U+2066, U+2028...), in keys and values; stdout must carry each as
a ``\\uXXXX`` escape and still be valid JSON that decodes back to the same reply.
Ordinary non-ASCII (accents, emoji) is left as it is on a UTF-8 stdout.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from pathlib import Path

import trio

from asyncapy import Client, Packet, Server
from asyncapy.cli import escape_unsafe
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]

HOSTILE = "\u202eevil\u009b31m\u0085\x1b[2J\x07\u2066\u2069\u200f\u061c\u2028\u2029\x7f\x80"
REPLY = {"text": "ok " + HOSTILE + " é 😀", HOSTILE: [HOSTILE], "n": 1}


def _unsafe(text: str) -> list[str]:
    return [
        c for c in text
        if unicodedata.category(c) in ("Cc", "Zl", "Zp")
        or unicodedata.bidirectional(c) in ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")
        or c in "\u200e\u200f\u061c"
    ]


def test_escape_unsafe_leaves_nothing_unsafe_in_the_whole_bmp():
    every = "".join(chr(code) for code in range(0x10000) if not 0xD800 <= code <= 0xDFFF)
    escaped = escape_unsafe(every)
    assert _unsafe(escaped) == []  # not even a newline
    assert "é" in escaped and "\u00a0" in escaped  # ordinary text stays


async def test_send_prints_hostile_replies_escaped():
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler()
    async def hostile(client: Client, packet: Packet) -> None:
        await client.send(Packet(REPLY, encoding=client.encoding))

    async with serving(server) as (host, port):
        for pretty in ("--no-pretty", "--pretty"):
            with trio.fail_after(20):
                result = await trio.run_process(
                    [sys.executable, "-m", "asyncapy", "send", "--no-tls", f"{host}:{port}", "{}", pretty],
                    cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False,
                    env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                )
            assert result.returncode == 0, result.stderr.decode()
            out = result.stdout.decode("utf-8")
            body = out[:-1]  # the one newline that ends the document
            if pretty == "--pretty":
                body = body.replace("\n", "")  # the indentation's own line breaks
            assert _unsafe(body) == [], [hex(ord(c)) for c in _unsafe(body)]
            assert "\\u202e" in out and "\\u009b" in out and "\\u0085" in out
            assert "é 😀" in out
            assert json.loads(out) == REPLY
