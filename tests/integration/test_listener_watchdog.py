"""A listening socket that stops accepting while ``python -m app`` runs ends the server (exit
1, an error logged) instead of leaving a process that is alive and never accepts a connection
again. uvloop closes its listener without a word when an accept fails in a way it does not
recover from (EMFILE once libuv could not take its spare descriptor back: an error status in
its listen callback, ``UVStreamServer._fatal_error``). That failure needs a race to happen, so
here the listener is taken away as it would be: its descriptor replaced by another file's (the
listener closed, its number reused), or the socket told to stop listening. The server,
:class:`app.__main__.DrainingServer` as ``python -m app`` runs it (uvloop, the app and its
engine), notices within about a second, logs it and drains; ``main`` then returns 1."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from app.__main__ import DrainingServer, listener_identity, listener_problem, server_config
from app.main import create_app
from tests.conftest import _test_settings
from tests.integration.test_durability import Proc

pytestmark = pytest.mark.integration


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_a_listener_that_goes_is_told_apart_from_one_that_listens() -> None:
    sock, other = listening(), socket.socket()
    try:
        identity = listener_identity(sock)
        assert listener_problem(sock, identity) is None
        sock.shutdown(socket.SHUT_RD)
        assert listener_problem(sock, identity) == "it no longer listens"
        os.dup2(other.fileno(), sock.fileno())  # closed, its number taken by another socket
        assert listener_problem(sock, identity) == \
            "its descriptor was closed (another file has its number now)"
        os.close(sock.detach())  # closed, its number free
        assert listener_problem(sock, identity) is not None
    finally:
        sock.close()
        other.close()


@pytest.mark.parametrize("how", ["replaced", "shut"])
def test_the_server_exits_when_its_listener_goes(how: str, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    settings = _test_settings(port=0, warm_up=False)
    app = create_app(settings)
    server = DrainingServer(server_config(app, settings), app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    listener = server.servers[0].sockets[0]
    port = listener.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # (it accepts)
    other = socket.socket()
    try:
        with caplog.at_level(logging.ERROR, logger="optserve"):
            if how == "replaced":  # as uvloop's close leaves it, the number reused meanwhile
                os.dup2(other.fileno(), listener.fileno())
            else:
                with socket.socket(fileno=os.dup(listener.fileno())) as dup:
                    dup.shutdown(socket.SHUT_RD)
            thread.join(timeout=30)
            assert not thread.is_alive(), "the server kept running without its listener"
        problem = ("its descriptor was closed (another file has its number now)"
                   if how == "replaced" else "it no longer listens")
        assert server.listener_lost == f"the listening socket ('127.0.0.1', {port}): {problem}"
        assert app.state.draining is True
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(m.startswith(server.listener_lost) and "exiting with status 1" in m
                   for m in errors), errors
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        other.close()


def _steal_listener(pid: int, port: int) -> socket.socket:
    """A descriptor of process ``pid``'s socket listening on ``port`` (``pidfd_getfd``: the
    same socket, not a new one)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd_getfd = 438  # (x86_64 and aarch64 alike)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(pidfd_getfd, pidfd, int(name), 0)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            try:
                if (sock.family == socket.AF_INET and sock.getsockname()[1] == port
                        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no socket of {pid} listens on {port}")


def test_python_m_app_exits_1_when_its_listener_stops_listening(tmp_path: Path) -> None:
    """``python -m app`` itself: its listener told to stop listening from outside (the same
    socket, taken with ``pidfd_getfd``), it logs the error, drains and exits with status 1."""
    proc = Proc(tmp_path / "data")
    proc.start()
    try:
        assert proc.proc is not None
        sock = _steal_listener(proc.proc.pid, proc.port)
        with sock:
            sock.shutdown(socket.SHUT_RD)
        assert proc.proc.wait(30) == 1
        assert "no longer listens: no connection can be accepted any more" in proc.log()
    finally:
        proc.stop()
