"""``asyncapy run --workers N``: several processes, one port, one command.

Every test runs the real command line as a subprocess (``tests/e2e/processes.py``)
with ``tests/e2e/workers_app.py``, whose replies carry the pid of the worker that
answered. They check what an operator relies on: the port is shared and served by
several processes; sessions limits are refused without a shared store; a killed
worker comes back; SIGTERM lets in-flight requests finish and leaves no process
behind; a second signal or a crash loop ends it with a non-zero status.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from asyncapy.client import Client

from .processes import Running, alive, ask

APP = "tests.e2e.workers_app:app"
LIMITED = "tests.e2e.workers_app:limited"
CRASHING = "tests.e2e.workers_app:crashing"


def pids_answering(port: int, want: set[int], tries: int = 200) -> set[int]:
    """Pids seen answering fresh connections, until all of ``want`` were seen (or
    ``tries`` connections were made)."""
    seen: set[int] = set()
    for _ in range(tries):
        seen.add(ask(port, {"who": "?"})["pid"])
        if want <= seen:
            break
    return seen


def test_two_workers_share_one_port_and_both_serve(redis_url):
    """The point of --workers: one port, several processes answering on it, the app's
    hooks run in each, and the real port printed when 0 was asked for."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)  # port 0: the supervisor printed the real one
        workers = run.worker_pids()
        assert len(workers) == 2 and run.process.pid not in workers
        # Many connections at once, all answered, by worker processes only...
        clients = [Client(tls=False, timeout=5) for _ in range(16)]
        try:
            for client in clients:
                client.connect("127.0.0.1", port)
            for n, client in enumerate(clients):
                client.send({"n": n})
            replies = [client.receive() for client in clients]
        finally:
            for client in clients:
                client.disconnect()
        assert {reply["pid"] for reply in replies} <= workers
        # ...and over a series of connections, by both of them.
        assert pids_answering(port, workers) == workers
        status = run.stop()
    assert status == 0, run.output
    assert "Traceback" not in run.output
    assert "127.0.0.1" in run.wait_for(re.compile(r"AsyncAPY serving on"))[0].string
    host_port = redis_url.removeprefix("redis://").removesuffix("/0")
    assert f"with 2 worker processes, sessions in RedisSessionStore at redis://{host_port}/0" in run.output
    # Each worker ran the app's hooks once.
    assert sorted(run.out) == sorted(
        [f"workers_app: setup ran in {pid}" for pid in workers]
        + [f"workers_app: shutdown ran in {pid}" for pid in workers]
    )


def test_workers_serve_tls_on_the_inherited_socket(redis_url, tls_files):
    """The supervisor binds a plain socket; each worker layers TLS on its copy."""
    tls = ("--certfile", tls_files["certfile"], "--keyfile", tls_files["keyfile"])
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url, *tls) as run:
        port = run.serving(2)
        workers = run.worker_pids()
        for _ in range(4):
            with Client(tls=True, cafile=tls_files["cafile"], timeout=5) as client:
                client.connect("127.0.0.1", port)
                assert client.request({"tls": True})["pid"] in workers
        assert run.stop() == 0, run.output
    assert "(TLS) with 2 worker processes" in run.output


def test_a_session_limit_holds_across_workers_with_a_redis_store(redis_url):
    """limited allows 3 sessions per address: the 4th is refused, whichever worker
    accepts it, because the workers count in one Redis store."""
    with Running.asyncapy("run", LIMITED, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)
        clients = [Client(tls=False, timeout=5) for _ in range(4)]
        try:
            for client in clients[:3]:
                client.connect("127.0.0.1", port)
                assert "pid" in client.request({"hold": True})
            clients[3].connect("127.0.0.1", port)
            refusal = clients[3].receive()
        finally:
            for client in clients:
                client.disconnect()
        assert refusal == {"status": "failure", "error": "ERR_SESSION_LIMIT_REACHED"}
        assert run.stop() == 0, run.output


@pytest.mark.parametrize("store", [[], ["--store", "memory://"]])
def test_several_workers_with_a_session_limit_and_a_memory_store_are_refused(store):
    """Each worker's in-memory store would count only its own sessions: the limit
    would silently multiply. Refused up front, with what to do instead."""
    with Running.asyncapy("run", LIMITED, "--port", "0", "--workers", "2", *store) as run:
        status = run.finish()
    assert status == 2
    lines = run.err
    assert len(lines) == 1, run.output
    assert lines[0].startswith("asyncapy:")
    assert "session_limit 3" in lines[0] and "--store redis://" in lines[0]
    assert run.out == []  # no worker was started: no setup() ran


@pytest.mark.parametrize(
    "args, names",
    [
        (["--workers", "0"], ["workers", "0"]),
        (["--workers", "2", "--store", "ftp://nowhere"], ["store", "ftp://nowhere"]),
    ],
)
def test_bad_workers_or_store_values_print_one_line(args, names):
    """Bad flag values fail like the other flags: one line naming them, status 2."""
    with Running.asyncapy("run", APP, *args) as run:
        status = run.finish()
    assert status == 2
    assert len(run.err) == 1 and run.err[0].startswith("asyncapy:"), run.output
    for name in names:
        assert name in run.err[0]


def test_a_port_in_use_is_one_line_before_any_worker_starts():
    """The supervisor binds before starting workers: a busy port is one error line,
    not N worker tracebacks (and no setup() runs)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with Running.asyncapy("run", APP, "--port", str(port), "--workers", "2") as run:
            status = run.finish()
    assert status == 1
    assert len(run.err) == 1 and run.err[0].startswith("asyncapy:"), run.output
    assert f"cannot listen on 127.0.0.1:{port}" in run.err[0]
    assert run.out == []


def test_a_killed_worker_is_restarted_and_serves_again(redis_url):
    """A worker killed from outside (OOM killer, SIGKILL) is replaced; the port never
    stops being served meanwhile."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)
        victim, survivor = sorted(run.worker_pids())
        os.kill(victim, signal.SIGKILL)
        run.wait_for(re.compile(rf"\(pid {victim}\) was killed by SIGKILL: restarting"))
        run.wait_for(re.compile(r"Worker \d \(pid \d+\) serving"), count=3)
        (newcomer,) = run.worker_pids() - {victim, survivor}
        assert not alive(victim)
        # Service went on, and the new worker takes its share.
        assert pids_answering(port, {survivor, newcomer}) == {survivor, newcomer}
        assert run.stop() == 0, run.output
    assert f"workers_app: setup ran in {newcomer}" in run.out


def test_sigterm_finishes_in_flight_requests_then_every_process_exits_zero(redis_url):
    """SIGTERM (docker stop, systemd) drains: the slow request is answered, every
    worker runs shutdown() and exits, the supervisor exits 0 and nothing is left."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)
        workers = run.worker_pids()
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            client.send({"sleep": 1.0})
            time.sleep(0.3)  # the handler is sleeping now
            started = time.monotonic()
            run.process.send_signal(signal.SIGTERM)
            reply = client.receive()  # the in-flight request is answered...
            assert reply["slept"] == 1.0 and reply["pid"] in workers
            assert client.receive_raw() == b""  # ...then the session is closed
        status = run.finish()
        assert time.monotonic() - started < 5  # not the whole grace period
    assert status == 0, run.output
    assert not any(alive(pid) for pid in workers)
    assert sorted(line.split()[1] for line in run.out) == ["setup", "setup", "shutdown", "shutdown"]
    with pytest.raises(ConnectionRefusedError):
        ask(port, {"after": "stop"})


def test_ctrl_c_at_a_terminal_is_one_graceful_stop(redis_url):
    """Ctrl-C sends SIGINT to the whole foreground process group. The workers must not
    see it besides the supervisor's SIGTERM: two signals would force them to stop."""
    command = ("run", APP, "--port", "0", "--workers", "2", "--store", redis_url)
    with Running.asyncapy(*command, new_session=True) as run:
        port = run.serving(2)
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            client.send({"sleep": 0.5})
            time.sleep(0.2)
            os.killpg(run.process.pid, signal.SIGINT)
            assert client.receive()["slept"] == 0.5
        assert run.finish() == 0, run.output
    assert "Second" not in run.output
    assert len(run.matches(re.compile("shutdown ran"), stream="out")) == 2


def test_a_second_signal_kills_the_workers_and_fails(redis_url):
    """An operator who presses Ctrl-C twice wants out now: workers are killed even
    with a request in flight, and the status says the stop was not clean."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)
        workers = run.worker_pids()
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            client.send({"sleep": 30})  # longer than the grace: only a kill ends it
            time.sleep(0.3)
            run.process.send_signal(signal.SIGINT)  # Ctrl-C...
            run.wait_for(re.compile(r"SIGINT received: stopping"))
            run.process.send_signal(signal.SIGINT)  # ...twice
            status = run.finish(timeout=5)
    assert status != 0
    assert "Second SIGINT: killing the workers" in run.output
    assert not any(alive(pid) for pid in workers)


def test_workers_of_a_killed_supervisor_stop_by_themselves(redis_url):
    """A supervisor killed with SIGKILL cannot forward anything: its workers notice
    (their control channel closes) and stop gracefully instead of lingering."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        run.serving(2)
        workers = run.worker_pids()
        run.process.kill()
        run.process.wait(timeout=5)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), run.output
        run.wait_for(re.compile("The supervisor is gone: shutting down"), count=2)
        run.wait_for(re.compile("shutdown ran"), count=2, stream="out")


def test_a_worker_crashing_in_a_loop_makes_the_supervisor_give_up():
    """crashing's setup() raises: the worker never serves; after the policy's budget
    (3 start failures in a row, backing off from 0.1 s) the supervisor exits 1."""
    with Running.asyncapy("run", CRASHING, "--port", "0", "--workers", "1") as run:
        status = run.finish(timeout=5)
    # --workers 1 is the single process: it fails at once, no supervisor involved.
    assert status != 0 and "Worker" not in run.output
    with Running.asyncapy("run", CRASHING, "--port", "0", "--workers", "2") as run:
        status = run.finish(timeout=20)
    assert status == 1, run.output
    assert len(run.matches(re.compile(r"exited with status 1 before it served: restarting it in"))) >= 2
    assert run.matches(re.compile(r"before it served, 3 times in a row: giving up"))
    assert run.matches(re.compile(r"AsyncAPY stopped: every worker has exited"))


def test_one_worker_is_the_plain_single_process_server():
    """--workers 1 is no flag at all: this very process serves, and a session limit
    with the in-memory store is fine."""
    with Running.asyncapy("run", LIMITED, "--port", "0", "--workers", "1") as run:
        port = int(run.wait_for(re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+) \(plain TCP\), sessions in MemorySessionStore"))[0].group(1))
        assert ask(port, {"who": "?"})["pid"] == run.process.pid
        assert run.stop() == 0, run.output
    assert "Worker" not in run.output and "worker processes" not in run.output
    assert run.out == [
        f"workers_app: setup ran in {run.process.pid}",
        f"workers_app: shutdown ran in {run.process.pid}",
    ]
