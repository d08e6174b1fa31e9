"""Regressions found by fuzzing and the security audit: timestamp extensions in every
form, a fixed nesting limit, exceptions out of the test client, a clean fuzz smoke run."""

from __future__ import annotations

import pytest

from asyncapy import Server
from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.errors import CodecError
from asyncapy.testing import open_test_client
from fuzz.campaign import Campaign


def echo_server(**settings) -> Server:
    server = Server(addr="127.0.0.1", port=0, **settings)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    return server


def zi_frame(payload: bytes) -> bytes:
    return (len(payload) + 2).to_bytes(4, "big") + b"\x16\x01" + payload


def json_frame(payload: bytes) -> bytes:
    return (len(payload) + 2).to_bytes(4, "big") + b"\x16\x00" + payload


MALFORMED = {"status": "failure", "error": "ERR_REQUEST_MALFORMED"}

# -- 1. domain/codecs.py: MessagePack timestamps slip through as datetime ------------------
# The first guard knew only fixext4, fixext8 and ext8-of-12 headers; msgspec also decodes
# ext8 of length 4 or 8, and ext16/ext32 of length 4, 8 or 12, with type -1 (0xff).
TIMESTAMPS = [
    pytest.param(b"\x81\xa1a\xc7\x04\xff" + bytes(4), id="ext8-len4"),
    pytest.param(b"\x81\xa1a\xc7\x08\xff" + bytes(8), id="ext8-len8"),
    pytest.param(b"\x81\xa1a\xc8\x00\x04\xff" + bytes(4), id="ext16-len4"),
    pytest.param(b"\x81\xa1a\xc8\x00\x0c\xff" + bytes(12), id="ext16-len12"),
    pytest.param(b"\x81\xa1a\xc9\x00\x00\x00\x08\xff" + bytes(8), id="ext32-len8"),
]


@pytest.mark.parametrize("payload", TIMESTAMPS)
def test_every_timestamp_form_is_refused_by_the_ziproto_codec(payload):
    with pytest.raises(CodecError):
        ZIPROTO.decode(payload)


@pytest.mark.parametrize("payload", TIMESTAMPS)
async def test_a_timestamp_is_malformed_on_the_wire(payload, caplog):
    malformed = zi_frame(ZIPROTO.encode(MALFORMED))
    async with open_test_client(echo_server(), timeout=2) as client:
        await client.send_raw(zi_frame(payload))
        first = await client.receive_raw()  # today: an echo carrying a fixext4 timestamp
    async with open_test_client(echo_server(), timeout=2) as client:
        await client.send({"n": 1})  # a JSON session
        await client.receive()
        await client.send_raw(zi_frame(payload))
        second = await client.receive_raw()  # today: ERR_INTERNAL, and a traceback in the log
    assert first == malformed, first
    assert second == malformed, second
    assert not [r for r in caplog.records if r.exc_info]


# -- 2. domain/codecs.py: the nesting limit depends on the caller's stack -------------------
# Decoding refuses a payload only when the interpreter's recursion limit is hit, so how
# deep a payload may be depends on how deep the caller already is; and JSON decoding
# goes deeper than JSON encoding, so what decodes may not re-encode.
def nested_json(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def test_what_the_json_codec_decodes_it_can_encode():
    failures = []
    for depth in range(900, 1001):
        try:
            value = JSON.decode(nested_json(depth))
        except CodecError:
            continue
        try:
            JSON.encode(value)
        except CodecError:
            failures.append(depth)
    assert not failures, f"decoded but cannot be re-encoded at depths {failures}"


def _deeper(function, frames):
    return function() if frames == 0 else _deeper(function, frames - 1)


@pytest.mark.parametrize("codec, payload", [(JSON, nested_json), (ZIPROTO, lambda d: b"\x81\xa1a" + b"\x91" * d + b"\x90")])
def test_the_nesting_limit_does_not_depend_on_the_callers_stack(codec, payload):
    disagreements = []
    for depth in range(900, 1001):
        data = payload(depth)
        outcomes = []
        for frames in (0, 50):
            try:
                _deeper(lambda: codec.decode(data), frames)
                outcomes.append(True)
            except CodecError:
                outcomes.append(False)
        if outcomes[0] != outcomes[1]:
            disagreements.append(depth)
    assert not disagreements, f"accepted or refused depending on the stack at depths {disagreements}"


async def test_a_deep_but_accepted_payload_never_becomes_err_internal(caplog):
    """Over the server: every depth is echoed or refused as malformed, never
    ERR_INTERNAL with a traceback (today: depths about 985-989 in JSON)."""
    internal = []
    async with open_test_client(echo_server(), timeout=2) as client:
        for depth in range(950, 1001):
            await client.send_raw(json_frame(nested_json(depth)))
            reply = await client.receive()
            if reply.get("error") == "ERR_INTERNAL":
                internal.append(depth)
    assert not internal, f"ERR_INTERNAL at depths {internal}"
    assert not [r for r in caplog.records if r.exc_info]


# -- 3. asyncapy/testing/client.py: BaseExceptions raised in the block are swallowed --------
# The finally block cancels the nursery, then awaits client._abort(): that checkpoint
# raises Cancelled, which replaces the in-flight BaseException (pytest's Failed,
# KeyboardInterrupt, SystemExit...) and is then absorbed by the nursery's own scope.
# So pytest.fail() and a pytest.raises() that "DID NOT RAISE" inside the block pass.
class Stop(BaseException):
    pass


async def test_a_base_exception_in_the_block_propagates():
    with pytest.raises(Stop):
        async with open_test_client(echo_server()) as client:
            await client.request({"a": 1})
            raise Stop()


# -- 4. stores raise KeyError(key): the key reaches the log through a handler's traceback ----
def test_a_fuzz_smoke_run_finds_nothing(tmp_path):
    summary = Campaign(seed=1, findings_dir=str(tmp_path)).run(500)
    assert summary.runs == 500
    assert summary.ok, summary.report()
