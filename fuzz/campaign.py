"""The engine: mutate seeds, run :func:`fuzz.oracle.check` on each input, report.

``python -m fuzz --runs 200000 --seed 1`` (what ``make fuzz`` runs). It prints the
number of inputs, the time taken and a summary of what the inputs did; every finding
(a broken property, or any exception the oracle lets escape) is printed with its
input and saved under ``--findings`` (one file per kind of finding), and the exit
status is 1. ``python -m fuzz --replay FILE...`` runs saved inputs again.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from collections import Counter
from typing import Optional, Sequence

from . import oracle, seeds

__all__ = ["Campaign", "Summary", "mutate", "main"]

MAX_INPUT = 256 * 1024
"""Inputs are cut to this many bytes (the deepest seeds are 100 KB)."""

MAX_CORPUS = 20_000
"""The corpus stops growing here; seeds are always kept."""

MAX_KEPT = 16 * 1024
"""Larger inputs are run but not kept in the corpus (memory)."""


class FindingRecord:
    """One kind of finding: the first input that showed it, and how often it came back."""

    def __init__(self, key: tuple, message: str, data: bytes, detail: str) -> None:
        self.key = key
        self.message = message
        self.data = data
        self.detail = detail
        self.count = 1
        self.path: Optional[str] = None


class Summary:
    """What a campaign did: inputs run, time, behaviours, findings."""

    def __init__(self) -> None:
        self.runs = 0
        self.seconds = 0.0
        self.seed = 0
        self.requests = 0
        self.unrepresentable = 0
        self.errors: Counter = Counter()
        self.behaviours = 0
        self.corpus = 0
        self.findings: dict[tuple, FindingRecord] = {}

    @property
    def ok(self) -> bool:
        return not self.findings

    def report(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        lines = [
            f"fuzz: {self.runs} inputs in {self.seconds:.1f} s ({rate:,.0f}/s), seed {self.seed}",
            f"  corpus {self.corpus} inputs, {self.behaviours} distinct behaviours",
            (
                f"  {self.requests} requests decoded ({self.unrepresentable} of them declared the "
                "encoding the session does not speak, with values it cannot carry)"
            ),
            "  error replies: " + (", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"),
        ]
        if self.ok:
            lines.append("  findings: none")
        else:
            lines.append(f"  findings: {len(self.findings)} kind(s)")
            for record in self.findings.values():
                shown = record.data[:120].hex()
                more = f"... ({len(record.data)} bytes)" if len(record.data) > 120 else ""
                lines.append(f"  - {record.message} (x{record.count})")
                lines.append(f"    input: {shown}{more}")
                if record.path:
                    lines.append(f"    saved: {record.path} (replay: python -m fuzz --replay {record.path})")
        return "\n".join(lines)


# -- mutations ----------------------------------------------------------------------------------
def _interesting_length(rng: random.Random) -> bytes:
    size = rng.choice((2, 4, 8))
    value = rng.choice(seeds.INTERESTING_INTS) + rng.choice((-1, 0, 0, 1))
    value %= 1 << (8 * size)
    return value.to_bytes(size, rng.choice(("big", "little")))


def mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    """``data`` with 1 to 5 stacked random mutations (the config byte included)."""
    buf = bytearray(data) or bytearray(b"\x00")
    for _ in range(rng.choice((1, 1, 2, 2, 3, 5))):
        op = rng.randrange(14)
        size = len(buf)
        position = rng.randrange(1, size + 1) if size > 1 else 1
        if op == 0 and size > 1:  # flip a bit
            at = rng.randrange(1, size)
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and size > 1:  # an interesting byte
            at = rng.randrange(1, size)
            buf[at] = rng.choice((0, 1, 2, 0x16, 0x7F, 0x80, 0xFF, 0xC1, 0xC7, 0xC8, 0xC9, 0xCF, 0xD3, 0xDD, 0xDF))
        elif op == 2:  # insert random bytes
            buf[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and size > 2:  # delete a range
            end = min(size, position + rng.randrange(1, max(2, size // 4)))
            del buf[position:end]
        elif op == 4 and size > 2:  # duplicate a range
            end = min(size, position + rng.randrange(1, max(2, size // 4)))
            buf[end:end] = buf[position:end]
        elif op == 5:  # splice with another input
            other = rng.choice(corpus)
            cut = rng.randrange(1, len(other) + 1) if len(other) > 1 else 1
            buf = buf[:position] + other[cut:]
        elif op == 6 and size > 1:  # truncate
            del buf[rng.randrange(1, size + 1) :]
        elif op == 7:  # append another input's stream (pipelining)
            buf += rng.choice(corpus)[1:]
        elif op == 8:  # write an interesting length over the input
            value = _interesting_length(rng)
            buf[position : position + len(value)] = value
        elif op == 9:  # insert a token
            buf[position:position] = rng.choice(seeds.TOKENS)
        elif op == 10:  # overwrite with a token
            token = rng.choice(seeds.TOKENS)
            buf[position : position + len(token)] = token
        elif op == 11:  # a fresh valid packet, in the input's layout
            layout = oracle.config_of(buf[0]).layout
            buf[position:position] = seeds.random_packet(rng, layout)
        elif op == 12:  # another config: layout, sizes, default codec, splitting
            buf[0] = rng.randrange(256)
        else:  # small arithmetic on a byte
            if size > 1:
                at = rng.randrange(1, size)
                buf[at] = (buf[at] + rng.choice((-2, -1, 1, 2))) & 0xFF
    return bytes(buf[:MAX_INPUT])


# -- the campaign ----------------------------------------------------------------------------------
class Campaign:
    """A seeded fuzz campaign; :meth:`run` returns its :class:`Summary`."""

    def __init__(self, seed: int = 1, findings_dir: Optional[str] = None) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.findings_dir = findings_dir
        self.seeds = seeds.corpus()
        self.corpus: list[bytes] = list(self.seeds)
        self.behaviours: set = set()
        self.replies: set = set()
        self.summary = Summary()
        self.summary.seed = seed

    def one(self, data: bytes) -> None:
        """Run one input, recording its behaviour or its finding."""
        summary = self.summary
        summary.runs += 1
        try:
            outcome = oracle.check(data, self.replies)
        except oracle.Finding as finding:
            cause = finding.__cause__
            where = _where(cause) if cause is not None else ""
            self._record((finding.check, finding.message[:60], where), str(finding), data, finding)
            return
        except RecursionError as exc:  # the oracle is iterative: this came from the code under test
            self._record(("escape", "RecursionError", _where(exc)), f"[escape] RecursionError: {exc}", data, exc)
            return
        except Exception as exc:
            self._record(("escape", type(exc).__name__, _where(exc)), f"[escape] {type(exc).__name__}: {exc}", data, exc)
            return
        summary.requests += outcome.requests
        summary.unrepresentable += outcome.unrepresentable
        summary.errors.update(outcome.errors)
        if outcome.signature not in self.behaviours:
            self.behaviours.add(outcome.signature)
            if len(self.corpus) < MAX_CORPUS and len(data) <= MAX_KEPT:
                self.corpus.append(data)

    def _record(self, key: tuple, message: str, data: bytes, exc: BaseException) -> None:
        findings = self.summary.findings
        record = findings.get(key)
        if record is not None:
            record.count += 1
            if len(data) < len(record.data):  # keep the smallest reproducer
                record.data = data
                self._save(record)
            return
        detail = "".join(traceback.format_exception(exc))
        record = findings[key] = FindingRecord(key, message, data, detail)
        self._save(record)

    def _save(self, record: FindingRecord) -> None:
        if not self.findings_dir:
            return
        os.makedirs(self.findings_dir, exist_ok=True)
        name = "-".join(part for part in map(str, record.key) if part)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        record.path = os.path.join(self.findings_dir, f"{safe}.bin")
        with open(record.path, "wb") as file:
            file.write(record.data)
        with open(record.path[:-4] + ".txt", "w", encoding="utf-8") as file:
            file.write(record.message + "\n\n" + record.detail)

    def run(self, runs: int, progress: Optional[float] = None) -> Summary:
        """Run the seeds once (in a shuffled order; only half of ``runs`` at most, so a
        short run mutates too), then mutated inputs up to ``runs`` inputs in all."""
        started = time.perf_counter()
        last = started
        order = list(self.seeds)
        self.rng.shuffle(order)
        for data in order[: max(1, runs // 2)]:
            self.one(data)
        while self.summary.runs < runs:
            self.one(mutate(self.rng.choice(self.corpus), self.rng, self.corpus))
            if progress and self.summary.runs % 1000 == 0:
                now = time.perf_counter()
                if now - last >= progress:
                    last = now
                    print(
                        f"  ... {self.summary.runs} inputs, {len(self.behaviours)} behaviours, "
                        f"{len(self.summary.findings)} finding(s), {now - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        self.summary.seconds = time.perf_counter() - started
        self.summary.behaviours = len(self.behaviours)
        self.summary.corpus = len(self.corpus)
        return self.summary


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc`` in the code under test."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if f"{os.sep}fuzz{os.sep}" not in filename:
            where = f"{os.path.basename(filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def replay(paths: Sequence[str], check=None) -> int:
    """Run saved inputs again (through ``check``, the protocol oracle's by default);
    print each verdict; 1 if any still fails."""
    failed = 0
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        try:
            (check or oracle.check)(data)
        except Exception as exc:
            failed += 1
            print(f"{path}: FAIL {exc}")
            traceback.print_exception(exc)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _proxy_target():
    from . import proxy

    return proxy.ProxyCampaign, proxy.check


TARGETS = {"protocol": lambda: (Campaign, oracle.check), "proxy": _proxy_target}
"""``--target`` choices: the campaign class and the check of its saved inputs. The
PROXY header target (:mod:`fuzz.proxy`) is imported when chosen (it imports this
module)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to run (default 100000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: a run is reproducible (default 1)")
    parser.add_argument(
        "--findings", default=os.path.join("fuzz", "findings"), help="where to save failing inputs ('' not to)"
    )
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (0: none)")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run saved inputs instead of a campaign")
    parser.add_argument(
        "--target", choices=sorted(TARGETS), default="protocol", help="what to fuzz (default: protocol)"
    )
    args = parser.parse_args(argv)
    campaign_class, check = TARGETS[args.target]()
    if args.replay:
        return replay(args.replay, check)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    campaign = campaign_class(args.seed, args.findings or None)
    summary = campaign.run(args.runs, progress=args.progress or None)
    print(summary.report())
    return 0 if summary.ok else 1
