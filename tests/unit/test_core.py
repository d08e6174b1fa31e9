"""What handlers see (``Packet``, ``Session``, ``Handler``), the public names, and docs.

The last tests walk the public modules by introspection: every name in
``asyncapy.__all__`` and every public class and function of ``asyncapy/*.py`` and
``domain/*.py`` (methods included) must carry a docstring.
"""

import importlib
import inspect
import json
import pkgutil
import uuid
from collections.abc import Mapping

import pytest

import asyncapy
import asyncapy.core
import asyncapy.domain
import asyncapy.domain.errors
import asyncapy.errors
from asyncapy.core import Handler, Packet, Session
from asyncapy.errors import StopPropagation
from asyncapy.filters import Filters


# -- Packet --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [{"a": 1, "b": [True, None]}, '{"a": 1, "b": [true, null]}', b'{"a": 1, "b": [true, null]}',
     bytearray(b'{"a": 1, "b": [true, null]}')],
    ids=["dict", "str", "bytes", "bytearray"],
)
@pytest.mark.parametrize("encoding", ["json", "ziproto"])
def test_packet_inputs(fields, encoding):
    packet = Packet(fields, encoding)
    assert dict(packet) == {"a": 1, "b": [True, None]}
    assert packet.encoding == encoding
    assert packet.sender is None


def test_packet_json_bytes_may_hold_utf8():
    packet = Packet('{"name": "Zoë ✓"}'.encode("utf-8"), "json")
    assert packet["name"] == "Zoë ✓"


@pytest.mark.parametrize("encoding", ["xml", "JSON", "", None, 0, b"json"], ids=repr)
def test_packet_encoding_must_be_json_or_ziproto(encoding):
    with pytest.raises(ValueError, match="encoding"):
        Packet({"a": 1}, encoding)


@pytest.mark.parametrize("text", ['{"a": 1', "{'a': 1}", "", "nope", b"\xff\xfe{}"], ids=repr)
def test_packet_malformed_json_fails_at_once(text):
    with pytest.raises(ValueError):
        Packet(text, "json")


@pytest.mark.parametrize("text", ["[1, 2]", "[]", "42", '"text"', "null", "true"])
def test_packet_json_must_be_an_object(text):
    with pytest.raises(ValueError, match="object"):
        Packet(text, "json")


@pytest.mark.parametrize("fields", [42, None, [("a", 1)], 1.5], ids=repr)
def test_packet_other_inputs_are_refused(fields):
    with pytest.raises(ValueError):
        Packet(fields, "json")


def test_packet_is_a_read_only_mapping():
    packet = Packet({"a": 1, "b": "two"}, "json")
    assert isinstance(packet, Mapping)
    assert "a" in packet and "zzz" not in packet
    assert packet["b"] == "two"
    with pytest.raises(KeyError):
        packet["zzz"]
    assert sorted(packet) == ["a", "b"]
    assert len(packet) == 2
    assert packet.get("a") == 1 and packet.get("zzz") is None and packet.get("zzz", 0) == 0
    assert dict(packet.items()) == {"a": 1, "b": "two"}
    assert packet == {"a": 1, "b": "two"}
    with pytest.raises(TypeError):
        packet["a"] = 2
    with pytest.raises(TypeError):
        del packet["a"]
    with pytest.raises(AttributeError):
        packet.update({"a": 2})
    assert packet["a"] == 1


def test_packet_does_not_share_the_callers_dict():
    fields = {"a": 1}
    packet = Packet(fields, "json")
    fields["a"] = 2
    fields["b"] = 3
    assert dict(packet) == {"a": 1}


def test_packet_0_5_attributes():
    packet = Packet({"a": 1, "b": "ü"}, "json")
    assert packet.dict_payload == {"a": 1, "b": "ü"}
    copy = packet.dict_payload
    copy["a"] = 99
    assert packet["a"] == 1
    assert json.loads(packet.payload) == {"a": 1, "b": "ü"}
    assert isinstance(packet.payload, str)
    assert packet.length == len(packet.payload)


def test_packet_repr_shows_fields_and_encoding():
    text = repr(Packet({"a": 1}, "ziproto"))
    assert "'a': 1" in text and "ziproto" in text


def test_stop_propagation_called_plainly():
    packet = Packet({"a": 1}, "json")
    with pytest.raises(StopPropagation):
        packet.stop_propagation()


async def test_stop_propagation_awaited_the_0_5_way():
    packet = Packet({"a": 1}, "json")

    async def handler():
        await packet.stop_propagation()

    with pytest.raises(StopPropagation):
        await handler()


# -- Session -------------------------------------------------------------------------
class FakeClient:
    def __init__(self):
        self.closed = 0

    async def close(self):
        self.closed += 1


async def test_session():
    session_id = uuid.uuid4()
    peer = FakeClient()
    session = Session(session_id, peer, 1_700_000_000.5)
    assert session.session_id == session_id
    assert session.date == 1_700_000_000.5
    assert session.get_client() is peer
    assert str(session) == str(session_id)
    assert hash(session) == hash(session_id)
    assert session == Session(session_id, None, 0.0)
    assert session != Session(uuid.uuid4(), peer, 1_700_000_000.5)
    assert session != str(session_id)
    assert len({session, Session(session_id, peer, 2.0)}) == 1
    await session.close()
    assert peer.closed == 1


async def test_session_of_another_process_cannot_be_closed_here():
    session = Session(uuid.uuid4(), None, 1.0, server_id="host:1:abc")
    assert session.get_client() is None
    with pytest.raises(RuntimeError, match="host:1:abc"):
        await session.close()


# -- Handler -------------------------------------------------------------------------
async def test_handler_checks_its_filters_and_calls_its_function():
    calls = []

    async def echo(client, packet):
        calls.append((client, packet))
        return "answered"

    peer = type("Peer", (), {"address": "10.0.0.1", "ip": None})()
    only_q = Filters.Fields(q=None)
    handler = Handler(echo, [only_q])
    assert handler.filters == (only_q,) and handler.function is echo
    assert handler.check(peer, Packet({"q": 1}, "json")) is True
    assert handler.check(peer, Packet({"x": 1}, "json")) is False
    packet = Packet({"q": 1}, "json")
    assert await handler.call(peer, packet) == "answered"
    assert calls == [(peer, packet)]
    assert Handler(echo, None).check(peer, packet) is True
    assert "echo" in repr(handler)


def test_handler_refuses_a_sync_function():
    def blocking(client, packet):
        return None

    with pytest.raises(TypeError, match="async"):
        Handler(blocking, [])
    with pytest.raises(TypeError):
        Handler("not callable", [])


def test_handler_refuses_a_non_filter():
    async def handler(client, packet):
        return None

    with pytest.raises(TypeError, match="filter"):
        Handler(handler, ["10.0.0.1"])


# -- public names --------------------------------------------------------------------
def test_0_5_imports():
    import asyncapy.server
    from asyncapy import Client, Server
    from asyncapy import Packet as PublicPacket

    assert Client is asyncapy.core.Client
    assert PublicPacket is asyncapy.core.Packet
    assert Server is asyncapy.server.Server
    for name in asyncapy.__all__:
        assert hasattr(asyncapy, name), name


def test_errors_module():
    assert asyncapy.errors.StopPropagation is asyncapy.domain.errors.StopPropagation
    assert issubclass(StopPropagation, Exception)
    codes = [name for name in dir(asyncapy.domain.errors) if name.startswith("ERR_")]
    assert len(codes) == 8
    for name in codes:
        assert getattr(asyncapy.errors, name) == name, name
        assert name in asyncapy.errors.__all__
    assert set(asyncapy.errors.ALL_CODES) == set(codes)
    assert len(set(asyncapy.errors.ALL_CODES)) == len(asyncapy.errors.ALL_CODES)


# -- docstrings ----------------------------------------------------------------------
def _modules(package):
    yield package
    for info in pkgutil.iter_modules(package.__path__):
        yield importlib.import_module(f"{package.__name__}.{info.name}")


def _public_members(owner, module_name):
    """(qualified name, object) of public classes/functions defined in ``owner``."""
    prefix = f"{owner.__qualname__}." if inspect.isclass(owner) else ""
    for name, obj in vars(owner).items():
        if name.startswith("_"):
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            yield prefix + name, obj.fget, owner
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module_name:
            continue  # imported from elsewhere: checked where it is defined
        yield prefix + name, obj, owner
        if inspect.isclass(obj):
            yield from _public_members(obj, module_name)


def _undocumented():
    missing = []
    for package in (asyncapy, asyncapy.domain):
        for module in _modules(package):
            if not (module.__doc__ or "").strip():
                missing.append(module.__name__)
            for qualname, obj, owner in _public_members(module, module.__name__):
                if inspect.isclass(owner) and not inspect.isclass(obj):
                    # a method or property: an override may inherit the documentation
                    doc = inspect.getdoc(getattr(owner, qualname.rsplit(".", 1)[1]))
                else:
                    doc = obj.__doc__  # a class or function must document itself
                if not (doc or "").strip():
                    missing.append(f"{module.__name__}: {qualname}")
    return missing


def test_public_api_is_documented():
    assert _undocumented() == []


def test_names_in_all_are_documented():
    for name in asyncapy.__all__:
        obj = getattr(asyncapy, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj
            continue
        assert (obj.__doc__ or "").strip(), name


def test_the_docstring_check_notices_a_missing_docstring(monkeypatch):
    def undocumented_function():
        return None

    undocumented_function.__module__ = "asyncapy.util"
    monkeypatch.setattr(asyncapy.util, "brand_new_helper", undocumented_function, raising=False)
    assert _undocumented() == ["asyncapy.util: brand_new_helper"]


def test_the_docstring_check_notices_an_undocumented_method(monkeypatch):
    def fresh_method(self):
        return None

    monkeypatch.setattr(asyncapy.core.Session, "fresh_method", fresh_method, raising=False)
    fresh_method.__module__ = "asyncapy.core"
    assert _undocumented() == ["asyncapy.core: Session.fresh_method"]


async def test_a_client_made_by_hand_with_a_server_sends_as_in_0_5():
    """0.5's Client(address, server, stream, session, encoding): the server gives it its
    channel and protocol state, and answers get_sessions()."""
    import trio.testing

    from asyncapy.core import Client, Packet
    from asyncapy.server import Server

    ours, theirs = trio.testing.memory_stream_pair()
    client = Client("127.0.0.1", Server(port=0), ours, None, "json")
    await client.send(Packet({"hi": 1}, encoding="json"))
    assert b'{"hi": 1}' in await theirs.receive_some(100)
    assert await client.get_sessions() == []
