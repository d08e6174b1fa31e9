"""Filters: sync and async checks, &, | and ~ with left-to-right short-circuit evaluation."""

from __future__ import annotations

from inspect import isawaitable

import pytest
import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncapy.domain.filtering import All, Any_, Filter, Not, evaluate

CLIENT, PACKET = object(), object()


class Leaf(Filter):
    """A synchronous filter answering ``value`` and logging that it was asked."""

    def __init__(self, name: str, value, log: list) -> None:
        self.name, self.value, self.log = name, value, log

    def check(self, client, packet):
        assert client is CLIENT and packet is PACKET
        self.log.append(self.name)
        return self.value

    def __repr__(self) -> str:
        return self.name


class AsyncLeaf(Leaf):
    """The same, answering through an awaitable (as an I/O-bound filter would)."""

    async def check(self, client, packet):
        assert client is CLIENT and packet is PACKET
        self.log.append(self.name)
        return self.value


class TrioLeaf(Leaf):
    """An async filter that really suspends under trio before answering."""

    async def check(self, client, packet):
        await trio.lowlevel.checkpoint()
        self.log.append(self.name)
        await trio.lowlevel.checkpoint()
        return self.value


class Boom(Filter):
    def __init__(self, log: list) -> None:
        self.log = log

    def check(self, client, packet):
        self.log.append("boom")
        raise KeyError("boom")


def run(result):
    """Resolve a check result without any event loop (the leaves never really suspend)."""
    if not isawaitable(result):
        return result
    iterator = result.__await__()
    try:
        while True:
            iterator.send(None)
    except StopIteration as stop:
        return stop.value


# -- plain filters and evaluate() -----------------------------------------------------
def test_base_filter_lets_everything_through():
    assert Filter().check(CLIENT, PACKET) is True
    assert evaluate((), CLIENT, PACKET) is True


def test_synchronous_chains_answer_a_plain_bool():
    log: list = []
    assert evaluate((Leaf("a", True, log), Leaf("b", True, log)), CLIENT, PACKET) is True
    assert evaluate((Leaf("c", 1, log), Leaf("d", 0, log), Leaf("e", True, log)), CLIENT, PACKET) is False
    assert log == ["a", "b", "c", "d"]  # "e" never asked: the chain stopped at "d"
    assert (Leaf("x", True, log) & Leaf("y", "yes", log)).check(CLIENT, PACKET) is True
    assert (Leaf("x", None, log) | Leaf("y", [], log)).check(CLIENT, PACKET) is False
    assert (~Leaf("x", 0, log)).check(CLIENT, PACKET) is True


def test_an_async_filter_makes_the_answer_awaitable_and_later_ones_wait_for_it():
    log: list = []
    result = evaluate((Leaf("a", True, log), AsyncLeaf("b", True, log), Leaf("c", True, log)), CLIENT, PACKET)
    assert isawaitable(result)
    assert log == ["a"]  # nothing after the async filter runs before it answered
    assert run(result) is True
    assert log == ["a", "b", "c"]


def test_async_failure_stops_the_chain():
    log: list = []
    result = evaluate((AsyncLeaf("a", False, log), Leaf("b", True, log), AsyncLeaf("c", True, log)), CLIENT, PACKET)
    assert run(result) is False
    assert log == ["a"]


async def test_async_filters_are_really_awaited_under_trio():
    log: list = []
    combined = (TrioLeaf("a", True, log) & Leaf("b", True, log)) | TrioLeaf("c", True, log)
    result = combined.check(CLIENT, PACKET)
    assert isawaitable(result) and log == []
    assert await result is True
    assert log == ["a", "b"]
    negated = ~TrioLeaf("d", True, log)
    assert await negated.check(CLIENT, PACKET) is False
    assert await evaluate((Leaf("e", True, log), TrioLeaf("f", 1, log), TrioLeaf("g", True, log)), CLIENT, PACKET) is True
    assert log == ["a", "b", "d", "e", "f", "g"]


# -- & | ~ and short-circuits ---------------------------------------------------------
@pytest.mark.parametrize("first", [Leaf, AsyncLeaf])
@pytest.mark.parametrize("second", [Leaf, AsyncLeaf])
def test_and_short_circuits_on_a_failure(first, second):
    log: list = []
    assert run((first("a", False, log) & second("b", True, log)).check(CLIENT, PACKET)) is False
    assert log == ["a"]
    assert run((first("c", True, log) & second("d", False, log)).check(CLIENT, PACKET)) is False
    assert log == ["a", "c", "d"]


@pytest.mark.parametrize("first", [Leaf, AsyncLeaf])
@pytest.mark.parametrize("second", [Leaf, AsyncLeaf])
def test_or_short_circuits_on_a_success(first, second):
    log: list = []
    assert run((first("a", True, log) | second("b", False, log)).check(CLIENT, PACKET)) is True
    assert log == ["a"]
    assert run((first("c", False, log) | second("d", True, log)).check(CLIENT, PACKET)) is True
    assert run((first("e", False, log) | second("f", 0, log)).check(CLIENT, PACKET)) is False
    assert log == ["a", "c", "d", "e", "f"]


def test_short_circuit_skips_a_filter_that_would_raise():
    log: list = []
    assert run((AsyncLeaf("a", False, log) & Boom(log)).check(CLIENT, PACKET)) is False
    assert run((Leaf("b", True, log) | Boom(log)).check(CLIENT, PACKET)) is True
    assert log == ["a", "b"]


@pytest.mark.parametrize("leaf", [Leaf, AsyncLeaf])
def test_not(leaf):
    log: list = []
    assert run((~leaf("a", True, log)).check(CLIENT, PACKET)) is False
    assert run((~leaf("b", None, log)).check(CLIENT, PACKET)) is True
    assert run((~~leaf("c", "x", log)).check(CLIENT, PACKET)) is True
    assert log == ["a", "b", "c"]


def test_operators_build_the_combinators():
    log: list = []
    a, b = Leaf("a", True, log), Leaf("b", True, log)
    assert type(a & b) is All and (a & b).filters == (a, b)
    assert type(a | b) is Any_ and (a | b).filters == (a, b)
    assert type(~a) is Not and (~a).inner is a
    assert repr((a & ~b) | a) == "((a & ~b) | a)"


@pytest.mark.parametrize("other", [True, None, 1, lambda client, packet: True])
def test_filters_only_combine_with_filters(other):
    with pytest.raises(TypeError):
        Filter() & other
    with pytest.raises(TypeError):
        Filter() | other


def test_errors_of_filters_propagate():
    log: list = []
    with pytest.raises(KeyError):
        (Leaf("a", True, log) & Boom(log)).check(CLIENT, PACKET)
    pending = (AsyncLeaf("b", True, log) & Boom(log)).check(CLIENT, PACKET)
    with pytest.raises(KeyError):
        run(pending)
    assert log == ["a", "boom", "b", "boom"]


# -- any expression: the value of Python's own and/or/not, in Python's own order -------
def expressions():
    leaf = st.tuples(st.sampled_from(["sync", "async"]), st.booleans())
    return st.recursive(
        leaf,
        lambda inner: st.tuples(st.just("not"), inner)
        | st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=4)),
        max_leaves=12,
    )


def build(tree, log: list, names):
    """The Filter for ``tree`` and a reference thunk evaluating it with Python's operators."""
    kind = tree[0]
    if kind in ("sync", "async"):
        name = next(names)
        value = tree[1]
        flt = (Leaf if kind == "sync" else AsyncLeaf)(name, value, log)

        def reference(expected: list):
            expected.append(name)
            return value

        return flt, reference
    if kind == "not":
        inner, inner_ref = build(tree[1], log, names)
        return ~inner, lambda expected: not inner_ref(expected)
    parts = [build(sub, log, names) for sub in tree[1]]
    if kind == "and":
        flt = parts[0][0]
        for part, _ in parts[1:]:
            flt = flt & part
        return flt, lambda expected: all(ref(expected) for _, ref in parts)
    combined = Any_(*(part for part, _ in parts))
    return combined, lambda expected: any(ref(expected) for _, ref in parts)


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_any_composition_agrees_with_python_short_circuit(tree):
    log: list = []
    flt, reference = build(tree, log, iter(f"f{i}" for i in range(1000)))
    expected_log: list = []
    expected = bool(reference(expected_log))
    result = flt.check(CLIENT, PACKET)
    if not any(kind == "async" for kind in _kinds(tree)):
        assert not isawaitable(result)
    assert run(result) is expected
    assert log == expected_log


def _kinds(tree):
    if tree[0] in ("sync", "async"):
        yield tree[0]
    elif tree[0] == "not":
        yield from _kinds(tree[1])
    else:
        for sub in tree[1]:
            yield from _kinds(sub)
