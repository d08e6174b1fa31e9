"""The PROXY header target of the fuzz campaign (``python -m fuzz --target proxy``) does
not rot: a short run works end to end, its seeds pass, and its properties are not
vacuous: bugs planted in the parser are caught."""

from __future__ import annotations

import pytest

import asyncapy.domain.proxy
from asyncapy.domain.proxy import ProxyParser
from fuzz import campaign, oracle
from fuzz import proxy as target


def test_a_short_campaign_runs_and_reports(tmp_path, capsys):
    summary = target.ProxyCampaign(seed=5, findings_dir=str(tmp_path)).run(600)
    assert summary.runs == 600 and summary.ok, summary.report()
    assert summary.requests > 50  # inputs that parsed to a header
    assert summary.behaviours > 20
    report = summary.report()
    assert report.startswith("fuzz (PROXY headers): 600 inputs in ") and "findings: none" in report
    assert campaign.main(["--target", "proxy", "--runs", "50", "--progress", "0", "--findings", ""]) == 0
    assert "fuzz (PROXY headers): 50 inputs" in capsys.readouterr().out


def test_every_seed_passes_and_many_are_headers():
    outcomes = [target.check(seed) for seed in target.corpus()]
    assert sum(outcome.header for outcome in outcomes) > 60
    kinds = {outcome.signature[:3] for outcome in outcomes if outcome.header}
    assert {("header", 1, "INET"), ("header", 1, "INET6"), ("header", 1, "UNKNOWN"), ("header", 2, "INET"),
            ("header", 2, "INET6"), ("header", 2, "UNIX"), ("header", 2, "UNKNOWN")} <= kinds  # fmt: skip


def expect(data: bytes, check: str) -> None:
    with pytest.raises(oracle.Finding) as info:
        target.check(data)
    assert info.value.check == check, str(info.value)


V1 = bytes([target.config_byte(split_index=1)]) + b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nrest"
V2 = bytes([target.config_byte(split_index=1)]) + target.encode_v2("INET", "1.2.3.4", "5.6.7.8", 1, 2) + b"rest"


def test_it_catches_a_parser_that_depends_on_how_bytes_arrive(monkeypatch):
    original = ProxyParser.receive_data

    def receive_data(self, data):
        return original(self, data if len(data) != 1 else b"?")

    monkeypatch.setattr(ProxyParser, "receive_data", receive_data)
    expect(V1, "proxy-split")


def test_it_catches_an_exception_escaping_the_parser(monkeypatch):
    monkeypatch.setattr(asyncapy.domain.proxy, "_check_tlvs", lambda header, used: 1 / 0)
    expect(V2, "proxy-escape")


def test_it_catches_a_wrong_leftover(monkeypatch):
    original = asyncapy.domain.proxy._parse_v2

    def parse(buffer, max_length):
        event = original(buffer, max_length)
        return event._replace(leftover=event.leftover[1:]) if hasattr(event, "leftover") else event

    monkeypatch.setattr(asyncapy.domain.proxy, "_parse_v2", parse)
    expect(bytes([target.config_byte(split_index=2)]) + V2[1:], "proxy-leftover")


def test_it_catches_a_wrong_address(monkeypatch):
    original = asyncapy.domain.proxy._v1_address
    monkeypatch.setattr(
        asyncapy.domain.proxy, "_v1_address", lambda text, family: "9.9.9.9" if text == "1.2.3.4" else original(text, family)
    )
    expect(V1, "proxy-model")
    monkeypatch.undo()
    original_v2 = asyncapy.domain.proxy._parse_v2

    def swapped(buffer, max_length):  # source and destination ports swapped
        event = original_v2(buffer, max_length)
        if type(event) is not asyncapy.domain.proxy.ProxyHeader:
            return event
        return event._replace(source_port=event.destination_port, destination_port=event.source_port)

    monkeypatch.setattr(asyncapy.domain.proxy, "_parse_v2", swapped)
    expect(V2, "proxy-model")


def test_it_catches_unbounded_waiting(monkeypatch):
    monkeypatch.setattr(asyncapy.domain.proxy, "_parse_v1", lambda buffer: asyncapy.domain.proxy.NEED_DATA)
    expect(bytes([target.config_byte(split_index=2)]) + b"PROXY UNKNOWN " + b"x" * 200, "proxy-bounded")


def test_it_catches_need_data_after_the_peer_closed(monkeypatch):
    monkeypatch.setattr(ProxyParser, "receive_data", lambda self, data: None)
    expect(bytes([target.config_byte(split_index=2, eof=True)]) + b"PROXY ", "proxy-outcome")
