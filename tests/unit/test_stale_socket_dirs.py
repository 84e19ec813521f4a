"""The same-host transport's socket directories that servers killed with ``kill -9`` left
behind are removed at the next start (``app/transport/stale_dirs.py``), and only those."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.transport import stale_dirs


@pytest.fixture
def short(tmp_path: Path) -> Iterator[Path]:
    """A directory with a short path (pytest's ``tmp_path`` can be too long for a Unix
    socket's 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def made(parent: Path, name: str, age_s: float = 3600.0, listening: bool = False,
         keep: list[socket.socket] | None = None) -> Path:
    """A socket directory as a server makes it: a socket inside (bound; listening only if
    ``listening``, as a live server's), the directory ``age_s`` old."""
    d = parent / name
    d.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(d / stale_dirs.SOCKET_NAME))
        if listening:
            sock.listen(1)
            assert keep is not None
            keep.append(sock)
    finally:
        if not listening:
            sock.close()  # (a killed server's socket file stays, nobody behind it)
    then = time.time() - age_s
    os.utime(d, (then, then))
    return d


def test_only_directories_of_servers_gone_for_good_are_removed(short: Path) -> None:
    tmp_path = short
    gone, alive, keep = dead_pid(), os.getpid(), []
    stale = made(tmp_path, f"optserve-local-{gone}-abc_12")
    running = made(tmp_path, f"optserve-local-{alive}-def34")
    starting = made(tmp_path, f"optserve-local-{gone}-young1", age_s=5.0)
    elsewhere = made(tmp_path, f"optserve-local-{gone}-other9", listening=True, keep=keep)
    unknown = made(tmp_path, "optserve-local-k2j4xz")  # no pid in the name: not ours to judge
    a_file = tmp_path / f"optserve-local-{gone}-file"
    a_file.write_text("")
    os.utime(a_file, (time.time() - 3600, time.time() - 3600))
    try:
        assert stale_dirs.sweep(tmp_path) == [stale]
    finally:
        for s in keep:
            s.close()
    assert not stale.exists()
    assert all(p.exists() for p in (running, starting, elsewhere, unknown, a_file))
    assert stale_dirs.sweep(tmp_path / "missing") == []


def test_a_new_directory_names_its_server(tmp_path: Path) -> None:
    name = Path(__import__("tempfile").mkdtemp(prefix=stale_dirs.prefix(), dir=tmp_path)).name
    assert name.startswith(f"optserve-local-{os.getpid()}-")
    # the sweep reads it back as this (live) process's: kept, however old
    then = time.time() - 3600
    os.utime(tmp_path / name, (then, then))
    assert stale_dirs.sweep(tmp_path) == [] and (tmp_path / name).exists()


def test_the_transport_sweeps_at_start_and_removes_its_own_at_stop(short: Path) -> None:
    tmp_path = short
    import asyncio

    from app.transport.local import LocalTransport

    stale = made(tmp_path, f"optserve-local-{dead_pid()}-abc")
    transport = LocalTransport(engine=None, keys={}, default_tenant="default",  # type: ignore[arg-type]
                               parent=tmp_path)
    loop = asyncio.new_event_loop()
    try:
        transport.start(loop)
        assert not stale.exists()
        assert transport.dir is not None and transport.dir.parent == tmp_path
        assert transport.dir.name.startswith(stale_dirs.prefix())
        assert oct(transport.dir.stat().st_mode & 0o777) == "0o700"
    finally:
        transport.stop()
        loop.close()
    assert list(tmp_path.iterdir()) == []
