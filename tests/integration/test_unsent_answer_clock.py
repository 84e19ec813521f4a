"""An answer left partly unsent in the connection's buffer, its client reading nothing, is
dropped after ``OPTSERVE_BODY_TIMEOUT_S`` however little of it is left
(:mod:`app.api.send_clock`): the server's descriptor and connection slot come back
(``/proc/<pid>/fd``, ``optserve_connections`` in ``/metrics``). On real uvicorn servers
serving with both HTTP protocols ``python -m app`` may use (httptools, and h11 where httptools
is missing), in this process (its descriptors are the server's and the clients').

The clock ran only past the buffer's high-water mark (64 KiB): an answer that left less than
that unsent after the kernel's socket buffers took what they could (a client with a small
``SO_RCVBUF`` reading nothing) never started it, and the connection, closing after its
answer (``Connection: close``), held its descriptor and slot for as long as the client kept
it open. The answers here are sized so that 8, 24 and 40 KiB are left unsent: the kernel's
part is measured first on a large answer (its send queue, ``/proc/net/tcp``, and the
client's receive queue)."""

from __future__ import annotations

import base64
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol

# (not marked clock: it counts this process's descriptors, which the Ray suite's process
# opens and closes of its own)
pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
#: the bytes each answer leaves unsent past what the kernel takes (all below 64 KiB)
LEFT = (8 * 1024, 24 * 1024, 40 * 1024)


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    protocol = problem_protocol(request.param)
    settings = _test_settings(body_timeout_s=TIMEOUT_S, max_body_mb=128.0)
    with LiveServer(settings, http=protocol).serving() as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def make_session(http: httpx.Client, sid: str, n: int) -> None:
    r = http.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1}, "id": sid,
        "params": {"w": {"dtype": "float32", "shape": [n],
                         "b64": base64.b64encode(bytes(4 * n)).decode()}}})
    assert r.status_code == 201, r.text


def request(sid: str) -> bytes:
    return (b"GET /v1/sessions/%s/params HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            % sid.encode())


def answer_size(url: str, sid: str) -> int:
    """The bytes of the whole answer (head and body) to :func:`request`."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=30) as sock:
        sock.sendall(request(sid))
        size = 0
        while chunk := sock.recv(1 << 20):
            size += len(chunk)
    return size


def not_reading(url: str, sid: str) -> socket.socket:
    """A client with a small receive buffer that asks for ``sid``'s parameters and reads
    nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_of(url)))
    sock.sendall(request(sid))
    return sock


def kernel_holds(url: str, sock: socket.socket) -> int:
    """The bytes of the answer on ``sock`` in the kernel: the server socket's send queue
    (``/proc/net/tcp``) and the client's receive queue."""
    server, client = port_of(url), sock.getsockname()[1]
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    queued = [int(row[4].split(":")[0], 16) for row in rows
              if int(row[1].split(":")[1], 16) == server
              and int(row[2].split(":")[1], 16) == client]
    assert len(queued) == 1, rows
    received = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return queued[0] + received


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.split(" ")[0] == name]
    assert len(values) == 1, (name, text)
    return values[0]


#: the server under test's port, for :func:`descriptors` (set by the test)
_PORT: list[int] = []


def descriptors() -> int:
    """This process's descriptors of TCP sockets with the server's port at either end (its
    listener, the server's ends and the clients'): not every descriptor, as an object another
    test of this worker left for the garbage collector may close its own meanwhile (a count
    of 310 where 311 were expected, seen once)."""
    port = f"{_PORT[-1]:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            if port in (cols[1].rsplit(":", 1)[1], cols[2].rsplit(":", 1)[1]):
                inodes.add(cols[9])
    count = 0
    for fd in os.listdir(f"/proc/{os.getpid()}/fd"):
        try:
            link = os.readlink(f"/proc/{os.getpid()}/fd/{fd}")
        except OSError:  # (closed meanwhile)
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            count += 1
    return count


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_answer_left_below_the_high_water_mark_is_dropped(server: str) -> None:
    _PORT.append(port_of(server))
    with httpx.Client(base_url=server, timeout=60) as http:
        for sid, n in (("unsent-a", 10), ("unsent-b", 20), ("unsent-big", 1_000_000)):
            make_session(http, sid, n)
    per_param = (answer_size(server, "unsent-b") - answer_size(server, "unsent-a")) // 10
    assert per_param > 0
    base = answer_size(server, "unsent-a") - 10 * per_param
    # what the kernel takes of an answer a client reads none of
    with not_reading(server, "unsent-big") as sock:
        time.sleep(TIMEOUT_S / 2)
        kernel = kernel_holds(server, sock)
    assert 0 < kernel < answer_size(server, "unsent-big")
    with httpx.Client(base_url=server, timeout=60) as http:
        for left in LEFT:
            make_session(http, f"unsent-{left}", (kernel + left - base) // per_param)
    time.sleep(3 * TIMEOUT_S)  # (the connections above gone)
    fds, connections = descriptors(), gauge(server, "optserve_connections")
    clients = [not_reading(server, f"unsent-{left}") for left in LEFT]
    try:
        # each connection's answer is (in part) unsent; after the timeout each server end is
        # closed: the descriptors left are the clients' own, the connections the one asking
        time.sleep(0.5)
        assert descriptors() >= fds + 2 * len(clients)  # (both ends of each, meanwhile)
        assert wait_for(lambda: descriptors() == fds + len(clients), 6 * TIMEOUT_S), (
            descriptors(), fds, len(clients))
        assert gauge(server, "optserve_connections") == connections
    finally:
        for sock in clients:
            sock.close()
    assert wait_for(lambda: descriptors() == fds, 5)
