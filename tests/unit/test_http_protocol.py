"""The server's HTTP protocol (``app.transport.http_protocol``): a response's head and body
leave in one write, nothing is reordered or lost, and nothing is held past the event loop's
turn. Against a recording transport, then a real server on 127.0.0.1 read byte by byte."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from app.transport.http_protocol import HOLD_MAX, CoalescingTransport


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[bytes]]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", [bytes(data)]))

    def writelines(self, data: Any) -> None:
        self.calls.append(("writelines", [bytes(d) for d in data]))

    def close(self) -> None:
        self.calls.append(("close", []))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", []))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def run(body: Any) -> Recorder:
    async def main() -> Recorder:
        real = Recorder()
        body(CoalescingTransport(real, asyncio.get_running_loop()), real)
        await asyncio.sleep(0)  # the loop's turn ends: what is held goes out
        await asyncio.sleep(0)
        return real
    return asyncio.run(main())


def test_a_head_and_its_body_leave_together() -> None:
    def body(t: CoalescingTransport, real: Recorder) -> None:
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert real.calls == []  # held
        assert t.get_write_buffer_size() == 7 + 38
        t.write(memoryview(b"ok"))
    assert run(body).calls == [
        ("writelines", [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"ok"])]


def test_a_lone_write_goes_out_when_the_turn_ends() -> None:
    def body(t: CoalescingTransport, real: Recorder) -> None:
        t.write(b"head")
    assert run(body).calls == [("write", [b"head"])]


def test_large_writes_are_not_held_and_order_is_kept() -> None:
    big = b"x" * (HOLD_MAX + 1)

    def body(t: CoalescingTransport, real: Recorder) -> None:
        t.write(big)
        assert real.calls == [("write", [big])]
        t.write(b"a")
        t.write(big)
        t.write(b"b")
        t.writelines([b"c", b"d"])
    assert run(body).calls == [("write", [big]), ("writelines", [b"a", big]),
                               ("write", [b"b"]), ("writelines", [b"c", b"d"])]


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    def closing(t: CoalescingTransport, real: Recorder) -> None:
        t.write(b"last")
        t.close()
    assert run(closing).calls == [("write", [b"last"]), ("close", [])]

    def aborting(t: CoalescingTransport, real: Recorder) -> None:
        t.write(b"dropped")
        t.abort()
    assert run(aborting).calls == [("abort", [])]


def test_everything_else_is_the_real_transports() -> None:
    def body(t: CoalescingTransport, real: Recorder) -> None:
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        assert t.is_closing() is False
    run(body)


@pytest.mark.integration
def test_pipelined_requests_answer_in_order_over_one_connection(live_server: str) -> None:
    """Three requests written at once on one connection (HTTP/1.1 pipelining): three whole
    answers, in order, with their bodies; then a request with a body the server refuses."""
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        request = (b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                   b"GET /v1/optimizers HTTP/1.1\r\nhost: x\r\n\r\n"
                   b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"200"]
    assert b'"optimizers"' in answers[1] and b'"Adam"' in answers[1]
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(body) == length
