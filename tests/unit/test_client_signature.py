"""The bundled clients show their parameters: ``inspect.signature``, ``help()`` and
editors see ``byteorder, header_size, tls, encoding, timeout, *, ssl_context, cafile,
max_packet_size``, not ``(*args, **kwargs)``."""

from __future__ import annotations

import inspect
import pydoc

import pytest

from asyncapy.client import AsyncClient, Client

EXPECTED = [
    ("byteorder", inspect.Parameter.POSITIONAL_OR_KEYWORD, "big"),
    ("header_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, 4),
    ("tls", inspect.Parameter.POSITIONAL_OR_KEYWORD, True),
    ("encoding", inspect.Parameter.POSITIONAL_OR_KEYWORD, "json"),
    ("timeout", inspect.Parameter.POSITIONAL_OR_KEYWORD, 60),
    ("ssl_context", inspect.Parameter.KEYWORD_ONLY, None),
    ("cafile", inspect.Parameter.KEYWORD_ONLY, None),
    ("max_packet_size", inspect.Parameter.KEYWORD_ONLY, 16 * 1024 * 1024),
]


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_the_signature_names_every_parameter(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.kind, p.default) for p in parameters] == EXPECTED


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_help_shows_the_parameters(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    first = text.splitlines()[3]  # " |  Client(byteorder: 'str' = 'big', ...)"
    assert f"{cls.__name__}(byteorder" in first, first
    assert all(name in first for name, _, _ in EXPECTED), first
    assert "*args" not in text and "**kwargs" not in text


@pytest.mark.parametrize("cls, attribute", [(Client, "sock"), (AsyncClient, "stream")])
def test_a_new_client_is_not_connected(cls, attribute):
    client = cls(tls=False, timeout=None, max_packet_size=1024)
    assert getattr(client, attribute) is None
    assert (client.tls, client.timeout, client.max_packet_size) == (False, None, 1024)
    with pytest.raises(ConnectionError, match="not connected"):
        client._require()


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_positional_argument_too_many_is_refused(cls):
    with pytest.raises(TypeError):
        cls("big", 4, True, "json", 60, None)  # ssl_context is keyword-only
