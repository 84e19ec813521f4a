"""Another local user against the same-host transport, for real: a child process of this test
that has become ``nobody`` (uid 65534) tries to reach the server's socket and its segments.

- it cannot enter the socket's directory nor connect to the socket (the directory is 0700);
- given a way to the socket anyway (a hard link in an open directory, the socket's own mode
  opened: what a careless operator might do), its connection is closed unanswered by the
  server's ``SO_PEERCRED`` check, even with the right API key;
- it cannot open a bound segment through ``/proc/<server>/fd`` (the kernel's ptrace check);
- and through all that the server's own user steps through the segment as torch does.

Becoming another user needs root (CI runs as root); elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import LiveServer, _test_settings

import optserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="acting as another local user (setuid) needs root; CI runs as "
                              "root"),
]
KEY = "k" * 24
NOBODY = 65534
#: the child's exit codes
REFUSED, REACHED, UNEXPECTED = 0, 3, 4


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    live = LiveServer(_test_settings(api_keys=f"{KEY}:alpha", durability="memory"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def socket_path(url: str) -> Path:
    with optserve.Client(url, api_key=KEY, transport="http") as c:
        local = c._request(optserve._api.transport())["local"]
    assert local is not None
    return Path(local["socket"])


def as_nobody(attempt: Callable[[], int]) -> int:
    """``attempt()``'s exit code, run in a forked child that has become uid/gid 65534 (no
    supplementary groups) first; an exception in it is :data:`UNEXPECTED`."""
    with warnings.catch_warnings():  # (3.12+ warns of a fork with threads: the child
        warnings.simplefilter("ignore", DeprecationWarning)  # only makes system calls)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - (the child: only exits)
        code = UNEXPECTED
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = attempt()
        except BaseException:  # noqa: BLE001 - (any surprise is the child's answer)
            code = UNEXPECTED
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


def frame(message: dict[str, object]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack("<I", len(body)) + body


def steps_as_torch(url: str, seed: int) -> None:
    """The server's own user: a session stepped through the segment equals torch's."""
    p0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(seed + k))
             for k in range(1, 4)]
    p = p0.clone().requires_grad_(True)
    local = torch.optim.Adam([p], lr=1e-2)
    with optserve.Client(url, api_key=KEY) as c:
        info = c.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"w": p0})
        for g in grads:
            got = c.step(info.id, {"w": g})
            p.grad = g
            local.step()
            assert torch.equal(got.params["w"], p.detach())
        assert c._local is not None, "stepped through the same-host transport"
        c.delete_session(info.id)


def test_another_user_cannot_reach_the_socket(server: str) -> None:
    path = socket_path(server)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    def connect() -> int:
        try:
            os.listdir(path.parent)
        except PermissionError:
            pass
        else:
            return REACHED
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except PermissionError:
                return REFUSED
            return REACHED
    assert as_nobody(connect) == REFUSED
    steps_as_torch(server, 0)


def test_another_user_given_a_way_to_the_socket_is_closed_unanswered(server: str) -> None:
    path = socket_path(server)
    mode = stat.S_IMODE(path.stat().st_mode)
    with tempfile.TemporaryDirectory() as open_dir:
        os.chmod(open_dir, 0o777)
        link = Path(open_dir) / "s.sock"
        os.link(path, link)  # (one inode: its mode is the socket's)
        os.chmod(link, 0o666)
        try:
            def hello() -> int:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(30)
                    try:
                        s.connect(str(link))
                    except PermissionError:
                        return UNEXPECTED  # (the way given was not open: no test)
                    try:
                        s.sendall(frame({"op": "hello", "key": KEY}))
                        answer = s.recv(1 << 16)
                    except (ConnectionResetError, BrokenPipeError):
                        return REFUSED
                    return REFUSED if answer == b"" else REACHED
            assert as_nobody(hello) == REFUSED
        finally:
            os.chmod(path, mode)
    steps_as_torch(server, 10)


def test_another_user_cannot_open_a_bound_segment(server: str) -> None:
    p0 = torch.randn(64, generator=torch.Generator().manual_seed(5))
    with optserve.Client(server, api_key=KEY) as c:
        info = c.create_session(optimizer="SGD", options={"lr": 0.1}, params={"w": p0})
        c.step(info.id, {"w": torch.ones(64)})  # binds: the server maps a segment
        assert c._local is not None
        me = os.getpid()  # (the server runs in this process: LiveServer's thread)
        segments = [f"/proc/{me}/fd/{fd}" for fd in os.listdir(f"/proc/{me}/fd")
                    if _is_memfd(f"/proc/{me}/fd/{fd}")]
        assert segments, "a bound session's segment is a memfd of the server's"

        def open_segments() -> int:
            for where in segments:
                try:
                    os.close(os.open(where, os.O_RDWR))
                except PermissionError:
                    continue
                return REACHED
            return REFUSED
        assert as_nobody(open_segments) == REFUSED
        got = c.step(info.id, {"w": torch.ones(64)})
        p = p0.clone().requires_grad_(True)
        local = torch.optim.SGD([p], lr=0.1)
        for _ in range(2):
            p.grad = torch.ones(64)
            local.step()
        assert torch.equal(got.params["w"], p.detach())
        c.delete_session(info.id)


def _is_memfd(fd_path: str) -> bool:
    try:
        return os.readlink(fd_path).startswith("/memfd:")
    except OSError:
        return False
