"""Two AsyncAPY servers behind a real HAProxy (tests/real_parts.py), PROXY v2 and v1.

HAProxy listens on 127.0.0.1 and connects to the servers from 127.0.0.1, the one
trusted proxy; clients connect to HAProxy from 127.0.0.2 and 127.0.0.3 (distinct hosts
played on loopback). The servers share one session store, as servers on two machines
share Redis. Each client must be seen with its own address by ``session_limit`` (across
both servers), ``Filters.Ip`` and ``get_sessions()``, and HAProxy's health checks
(LOCAL headers with v2) must find both servers up.
"""

from __future__ import annotations

import logging
import re

import pytest
import trio

from asyncapy.adapters.memory import MemorySessionStore
from tests.real_parts import HAProxy

from ..conftest import serving
from .test_proxy_protocol import closed_without_reply, connect_from, whoami_app
from .wire import json_error


def checks_passed(proxy: HAProxy) -> list[str]:
    """The status and last health check's result of each backend server ("UP L4OK"),
    from HAProxy's ``show stat``."""
    lines = proxy.admin("show stat").splitlines()
    fields = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(fields, line.split(","))) for line in lines[1:] if line]
    return [f"{row['status']} {row['check_status']}" for row in rows if row["pxname"] == "servers" and row["svname"] not in ("BACKEND", "FRONTEND")]


@pytest.mark.parametrize("version", [2, 1])
async def test_clients_behind_haproxy_are_seen_as_themselves(make_server, version, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    store = MemorySessionStore()
    apps = [
        whoami_app(make_server, admin="127.0.0.3", session_limit=1, store=store, trusted_proxies=["127.0.0.1"])
        for _ in range(2)
    ]
    async with serving(apps[0]) as (host, port_a), serving(apps[1]) as (_, port_b):
        # Started synchronously (a moment): a cancelled test can leak no HAProxy.
        proxy = HAProxy([(host, port_a), (host, port_b)], proxy_version=version, check=True).start()
        try:
            with trio.fail_after(15):  # health checks (every 0.5 s) through the PROXY header
                while await trio.to_thread.run_sync(checks_passed, proxy) != ["UP L4OK"] * 2:
                    await trio.sleep(0.1)
            front_host, front_port = proxy.address
            two = await connect_from("127.0.0.2", front_host, front_port)
            assert await two.request({"who": 1}) == {"address": "127.0.0.2", "sessions": ["127.0.0.2"]}
            three = await connect_from("127.0.0.3", front_host, front_port)
            assert await three.request({"who": 1}) == {"address": "127.0.0.3", "sessions": ["127.0.0.3"]}
            # Round robin: the two clients are on the two servers.
            served = [sorted(s.client.address for s in app._sessions.live.values()) for app in apps]
            assert sorted(a for addresses in served for a in addresses if a != "127.0.0.1") == ["127.0.0.2", "127.0.0.3"]
            assert all(any(a != "127.0.0.1" for a in addresses) for addresses in served), served
            # Filters.Ip lets 127.0.0.3 through, not 127.0.0.2, both through one proxy.
            assert await three.request({"admin": 1}) == {"admin": "127.0.0.3"}
            assert await two.request({"admin": 1}) == {"denied": "127.0.0.2"}
            # session_limit=1 holds for each client across both servers, whichever
            # one HAProxy picks, while the other client is unaffected.
            for _ in range(2):
                again = await connect_from("127.0.0.2", front_host, front_port)
                await again.send(b"")
                assert await again.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
                await again.aclose()
            await two.aclose()
            with trio.fail_after(5):
                while any(
                    s.client.address == "127.0.0.2" for app in apps for s in app._sessions.live.values()
                ):
                    await trio.sleep(0.02)
            replacement = await connect_from("127.0.0.2", front_host, front_port)
            assert (await replacement.request({"who": 1}))["address"] == "127.0.0.2"
            assert (await three.request({"who": 1}))["sessions"] == ["127.0.0.3"]
            for wire in (replacement, three):
                await wire.aclose()
            # A client reaching a server directly, behind HAProxy's back, is refused.
            direct = await connect_from("127.0.0.2", host, port_a)
            await direct.send(b"\x00\x00\x00\x0a\x16\x00" + b'{"who":1}')
            await closed_without_reply(direct)
            await direct.aclose()
        finally:
            proxy.stop()  # synchronous: runs even in a cancelled scope
    text = caplog.text
    assert "Session started for 127.0.0.2" in text and "Session started for 127.0.0.3" in text
    assert "127.0.0.2 already holds 1 session(s): limit reached" in text
    assert "refused a connection from 127.0.0.2, not a trusted proxy" in text
    # Health checks (a LOCAL header with v2, then a reset) cost no warning; whether
    # one is served as HAProxy's own session or is gone before it is accepted is a
    # race (tests/e2e/test_proxy_protocol.py serves LOCAL headers deterministically).
    assert not re.search(r"PROXY protocol: closed a connection", text)
