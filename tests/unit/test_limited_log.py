"""LimitedLog: per-connection lines a flood cannot multiply, and what they leave out counted."""

from __future__ import annotations

import logging

from asyncapy.logs import LimitedLog

logger = logging.getLogger("asyncapy.test_limited_log")


def test_a_burst_then_the_count_of_what_was_left_out(caplog):
    caplog.set_level(logging.INFO, logger=logger.name)
    log = LimitedLog(logger, "refused alike", burst=2, interval=60)
    for n in range(5):
        log.warning("refused %d", n)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1"]
    assert log.suppressed == 3
    log.report("%d more refused, not logged")
    assert caplog.records[-1].getMessage() == "3 more refused, not logged" and log.suppressed == 0
    log.report("%d more refused, not logged")  # nothing left out: no line
    assert len(caplog.records) == 3


def test_the_next_line_let_through_carries_the_count(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = [100.0]
    monkeypatch.setattr("asyncapy.logs.time.monotonic", lambda: clock[0])
    log = LimitedLog(logger, "refused alike", burst=1, interval=1.0)
    log.warning("one")
    log.warning("two")
    log.warning("three")
    clock[0] += 1.0
    log.warning("four")
    assert [r.getMessage() for r in caplog.records] == ["one", "four (2 more refused alike since)"]


def test_lines_below_the_loggers_level_are_neither_logged_nor_counted(caplog):
    caplog.set_level(logging.WARNING, logger=logger.name)
    log = LimitedLog(logger, "sessions started", burst=1, interval=60)
    for _ in range(10):
        assert log.log(logging.INFO, "Session started") is False
    assert log.suppressed == 0  # nothing to report: nobody asked for these lines
    log.report("%d 'Session started' line(s) not logged")
    assert caplog.records == []


def test_the_record_names_the_callers_line(caplog):
    caplog.set_level(logging.INFO, logger=logger.name)
    log = LimitedLog(logger, "alike", burst=5)
    log.warning("from the test")
    log.log(logging.INFO, "also from the test")
    assert [r.filename for r in caplog.records] == ["test_limited_log.py"] * 2
