"""The fuzz driver (fuzz/, ``make fuzz``) does not rot: a short run works end to end,
and its oracle is not vacuous: bugs planted in the code under test are caught.

The campaign itself (at least 100,000 inputs) is not part of the test suite; its runs
are recorded in docs/security.md.
"""

from __future__ import annotations

import pytest

import asyncapy.domain.connection
from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.connection import Connection
from asyncapy.domain.framing import Framer
from fuzz import campaign, oracle, seeds


def valid_input(stream: bytes, **choices) -> bytes:
    return bytes([oracle.config_byte(**choices)]) + stream


GOOD = valid_input(
    seeds.frame(b'{"foo": "bar"}', 0) + seeds.frame(b"\x81\xa3foo\xa3bar", 1) + seeds.frame(b"{}", 7)
)


def test_a_short_campaign_runs_counts_and_reports(tmp_path, capsys):
    summary = campaign.Campaign(seed=7, findings_dir=str(tmp_path)).run(500)
    assert summary.runs == 500
    assert summary.requests > 0
    assert {"ERR_HEADER_INVALID", "ERR_REQUEST_MALFORMED", "ERR_PACKET_TOO_LARGE"} <= set(summary.errors)
    assert summary.behaviours > 50  # the seeds and mutations reach many behaviours
    report = summary.report()
    assert report.startswith("fuzz: 500 inputs in ")
    assert "findings:" in report
    for record in summary.findings.values():  # whatever it found is saved, to replay
        assert record.path and record.path.startswith(str(tmp_path))
        assert campaign.replay([record.path]) == 1
    capsys.readouterr()


def test_a_run_is_reproducible_from_its_seed():
    first = campaign.Campaign(seed=3)
    second = campaign.Campaign(seed=3)
    inputs = [campaign.mutate(first.rng.choice(first.corpus), first.rng, first.corpus) for _ in range(200)]
    again = [campaign.mutate(second.rng.choice(second.corpus), second.rng, second.corpus) for _ in range(200)]
    assert inputs == again


def test_the_seeds_pass_the_oracle_where_the_library_is_sound():
    """Valid pipelined packets of both encodings, in every layout and split mode."""
    for layout in range(6):
        for split in range(4):
            stream = b"".join(
                seeds.frame(payload, code, layout=oracle.LAYOUTS[layout])
                for payload, code in ((b'{"a": [1, 2.5, null, "x"]}', 0), (b"\x82\xa1a\x01\xa1b\xc4\x01z", 1), (b"{}", 0))
            )
            outcome = oracle.check(valid_input(stream, layout_index=layout, split_index=split))
            assert outcome.requests == 3


# -- the oracle catches planted bugs -----------------------------------------------------------
def expect_finding(data: bytes, check: str) -> oracle.Finding:
    with pytest.raises(oracle.Finding) as info:
        oracle.check(data)
    assert info.value.check == check, str(info.value)
    return info.value


def test_it_catches_a_wrong_protocol_rule(monkeypatch):
    monkeypatch.setattr(asyncapy.domain.connection, "PROTOCOL_VERSION", 23)
    expect_finding(GOOD, "model")


def test_it_catches_an_exception_escaping_the_connection(monkeypatch):
    original = Connection.next_event

    def next_event(self):
        if b"\x07" in self.framer._buffer:
            raise IndexError("planted")
        return original(self)

    monkeypatch.setattr(Connection, "next_event", next_event)
    expect_finding(GOOD, "connection-escape")


def test_it_catches_a_framer_that_depends_on_how_bytes_arrive(monkeypatch):
    original = Framer.receive_data

    def receive_data(self, data):
        return original(self, data if len(data) != 1 else b"")  # loses single bytes

    monkeypatch.setattr(Framer, "receive_data", receive_data)
    with pytest.raises(oracle.Finding) as info:
        oracle.check(valid_input(GOOD[1:], split_index=1))  # fed byte by byte
    assert info.value.check in ("split", "model")


def test_it_catches_a_wrong_complete_buffered(monkeypatch):
    monkeypatch.setattr(Framer, "complete_buffered", lambda self: False)
    expect_finding(GOOD, "complete-buffered")


def test_it_catches_a_codec_returning_a_non_map(monkeypatch):
    original = JSON.decode
    monkeypatch.setattr(JSON, "decode", lambda data: [] if data == b"{}" else original(data))
    expect_finding(GOOD, "codec-escape")


def test_it_catches_a_codec_that_does_not_round_trip(monkeypatch):
    original = ZIPROTO.encode
    monkeypatch.setattr(ZIPROTO, "encode", lambda obj: original({**obj, "extra": 1}))
    expect_finding(GOOD, "codec-round-trip")


def test_it_catches_a_foreign_value_in_a_decoded_payload(monkeypatch):
    import datetime

    original = ZIPROTO.decode
    monkeypatch.setattr(
        ZIPROTO, "decode", lambda data: {**original(data), "t": datetime.date.today()} if data == b"\x81\xa3foo\xa3bar" else original(data)
    )
    expect_finding(GOOD, "codec-type")


def test_the_campaign_reports_a_finding_and_exits_1(monkeypatch, tmp_path, capsys):
    original = Connection.next_event

    def next_event(self):
        if b"\x16\x07" in self.framer._buffer:
            raise RuntimeError("planted")
        return original(self)

    monkeypatch.setattr(Connection, "next_event", next_event)
    status = campaign.main(["--runs", "300", "--seed", "2", "--findings", str(tmp_path), "--progress", "0"])
    out = capsys.readouterr().out
    assert status == 1
    assert "fuzz: 300 inputs in " in out
    assert "[connection-escape] RuntimeError: planted" in out
    assert any(path.suffix == ".bin" for path in tmp_path.iterdir())
