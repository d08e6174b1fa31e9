"""The RESP packer and reply parser of the Redis stores' trio transport
(adapters/resp.py) against redis-py's own: the same bytes written, the same replies
read, whatever the socket's reads cut the bytes into."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from asyncapy.adapters.resp import INCOMPLETE, Replies, pack

ARGS = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)
COMMANDS = st.lists(st.lists(ARGS, min_size=1, max_size=6).map(lambda a: ("EVALSHA", *a)), min_size=1, max_size=5)


@given(COMMANDS)
def test_pack_writes_what_redis_py_writes(commands):
    assert pack(commands) == b"".join(redis.Connection().pack_commands(commands))


@pytest.mark.parametrize("value", [None, True, object()])
def test_pack_refuses_what_redis_py_refuses(value):
    with pytest.raises(redis.DataError):
        pack([("SET", "k", value)])


def parse_all(data: bytes, cuts: list[int] = ()) -> list:
    """Every reply in ``data``, fed in pieces cut at ``cuts``."""
    replies, out, start = Replies(), [], 0
    for end in [*sorted(set(cuts)), len(data)]:
        replies.feed(data[start:end])
        start = end
        while (reply := replies.next()) is not INCOMPLETE:
            out.append(reply)
    assert replies.pending() == 0
    return out


RESP2 = (
    b":42\r\n$5\r\nhello\r\n$-1\r\n+OK\r\n*3\r\n:1\r\n$0\r\n\r\n*-1\r\n"
    b"*2\r\n$1\r\na\r\n-ERR inner\r\n-NOSCRIPT No matching script\r\n"
)


@given(st.lists(st.integers(0, len(RESP2)), max_size=8))
def test_replies_are_whole_however_the_bytes_are_cut(cuts):
    replies = parse_all(RESP2, cuts)
    assert replies[:5] == [42, b"hello", None, b"OK", [1, b"", None]]
    nested, noscript = replies[5], replies[6]
    assert nested[0] == b"a" and type(nested[1]) is redis.ResponseError and str(nested[1]) == "inner"
    assert type(noscript) is redis.exceptions.NoScriptError


def test_resp3_types_read_as_redis_py_reads_them():
    data = (
        b"_\r\n#t\r\n#f\r\n,1.5\r\n(12345678901234567890\r\n=8\r\ntxt:abcd\r\n"
        b"%1\r\n+k\r\n:1\r\n~2\r\n:1\r\n:2\r\n>2\r\n+invalidate\r\n*0\r\n:7\r\n!9\r\nERR blobs\r\n"
    )
    replies = parse_all(data)
    assert replies[:8] == [None, True, False, 1.5, 12345678901234567890, b"abcd", {b"k": 1}, {1, 2}]
    assert replies[8] == 7  # the push message before it is not a reply
    assert type(replies[9]) is redis.ResponseError and str(replies[9]) == "blobs"


def test_a_connection_error_reply_is_raised_as_redis_py_does():
    replies = Replies()
    replies.feed(b"-LOADING Redis is loading the dataset in memory\r\n")
    with pytest.raises(redis.exceptions.BusyLoadingError):
        replies.next()


def test_decoded_replies_with_decode_responses():
    replies = Replies(lambda value: value.decode())
    replies.feed(b"$3\r\nabc\r\n+OK\r\n")
    assert [replies.next(), replies.next(), replies.next()] == ["abc", "OK", INCOMPLETE]


@pytest.mark.parametrize("data", [b"?what\r\n", b":12x\r\n", b"$abc\r\n", b"\r\n"])
def test_an_unknown_type_or_a_malformed_number_is_a_protocol_error(data):
    replies = Replies()
    replies.feed(data)
    with pytest.raises(redis.InvalidResponse):
        replies.next()
