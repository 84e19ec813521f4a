"""The server's memory under clients that hold it: bodies sent most of the way and then
stalled, and answers asked for and never read. The server is ``python -m app`` (what
``scripts/serve`` runs) at its defaults but the settings given, ``OPTSERVE_DURABILITY=memory``
and a fresh data directory.

    .venv/bin/python -m benchmarks.hostile_memory                       # the defaults
    .venv/bin/python -m benchmarks.hostile_memory --env OPTSERVE_MAX_BODIES_MB=2000

Three rounds, each on its own connections:

- ``stalled bodies``: ``--bodies`` connections each send the head of a step with a
  ``Content-Length`` of ``--body-mb`` MB and all of that body but its last MiB, then send
  nothing more;
- ``unread answers``: a session of ``--n`` float32 parameters; ``--answers`` connections (each
  with a 4 KiB receive buffer) ask for its parameters (safetensors) and read nothing;
- ``wide header``: one connection sends a step whose safetensors header names ``--entries``
  empty tensors (1.5 million: 89 MB), none of them the session's, and its answer is read at
  the end.

Each round runs on a server of its own, in ``--waves`` waves: each wave makes its
connections and waits ``--hold-bodies`` / ``--hold-answers`` seconds, the earlier waves' still
open. It prints the server's resident memory (``VmRSS``) before, after each wave, and after
every connection is closed; and what the connections got by then (the answer's status, if
any, and how the connection stands: ``open``, ``closed`` or ``reset``; and the bytes they
read when read at the end). The server's allocator keeps memory it freed for its next
allocations (``app.runtime.tune_allocator``): memory let go shows as a wave that does not add
to the one before. Nothing is asserted: the figures
go into the CHANGELOG with this command.
"""

from __future__ import annotations

import argparse
import base64
import socket
import statistics
import time
from collections.abc import Callable

import httpx
import orjson
import torch

from benchmarks._server import PIDS, app_env, app_server, free_port, memory_mb

MIB = 1 << 20


def rss_mb(pid: int) -> int:
    return int(memory_mb(pid)[0])


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def outcome(sock: socket.socket) -> tuple[str, int]:
    """How the connection stands: still ``open`` (nothing more to read now), or ended
    (``reset``, ``closed``), with the status of the answer that came, if any; and the bytes
    it got."""
    sock.settimeout(0.5)
    got, head = 0, b""
    try:
        while chunk := sock.recv(1 << 16):
            got += len(chunk)
            head += chunk[:64] if len(head) < 64 else b""
        ended = "closed"
    except TimeoutError:
        ended = "open"
    except ConnectionResetError:
        ended = "reset"
    status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")[9:12] if head else ""
    return f"{status} {ended}".strip(), got


def tally(outcomes: list[tuple[str, int]]) -> str:
    kinds = sorted({o for o, _ in outcomes})
    return "; ".join(
        f"{sum(o == k for o, _ in outcomes)} {k}, "
        f"{statistics.median(n for o, n in outcomes if o == k) / 1e6:.1f} MB each (median)"
        for k in kinds)


def create(url: str, n: int) -> str:
    w = torch.zeros(n)
    r = httpx.post(f"{url}/v1/sessions", timeout=300, json={
        "optimizer": "SGD", "options": {"lr": 0.1}, "durability": "memory",
        "params": {"w": {"dtype": "float32", "shape": [n],
                         "b64": base64.b64encode(w.numpy().tobytes()).decode()}}})
    r.raise_for_status()
    sid: str = r.json()["id"]
    return sid


def stalled_bodies(port: int, sid: str, count: int, size: int) -> list[socket.socket]:
    chunk = b"\0" * MIB
    held = []
    for _ in range(count):
        sock = connect(port)
        sock.settimeout(1)  # (a body the server does not read: given up on after 1 s)
        sock.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/octet-stream\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sent = 0
        try:
            while sent < size - MIB:
                sock.sendall(chunk)
                sent += MIB
        except TimeoutError:  # (the server is not reading it: it waits for room)
            pass
        held.append(sock)
    return held


def unread_answers(port: int, sid: str, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = connect(port, rcvbuf=4096)
        sock.sendall(f"GET /v1/sessions/{sid}/params HTTP/1.1\r\nHost: x\r\n"
                     "Accept: application/octet-stream\r\n\r\n".encode())
        held.append(sock)
    return held


def wide_header(port: int, sid: str, entries: int) -> list[socket.socket]:
    """A step whose safetensors header names ``entries`` empty tensors (none of them the
    session's)."""
    header = orjson.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                           for i in range(entries)})
    header += b" " * (-len(header) % 8)
    body = len(header).to_bytes(8, "little") + header
    sock = connect(port)
    sock.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
                 "Content-Type: application/octet-stream\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return [sock]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bodies", type=int, default=8, help="stalled bodies (connections)")
    ap.add_argument("--body-mb", type=int, default=500, help="each body's Content-Length, MB")
    ap.add_argument("--answers", type=int, default=20, help="unread answers (connections)")
    ap.add_argument("--n", type=float, default=1e7, help="the session's float32 parameters")
    ap.add_argument("--entries", type=int, default=1_500_000,
                    help="the wide header's entries (0: no such round)")
    ap.add_argument("--hold-bodies", type=float, default=10.0,
                    help="seconds the stalled bodies are held before the figures are read "
                    "(under OPTSERVE_BODY_TIMEOUT_S, 30: they then get 408s)")
    ap.add_argument("--hold-answers", type=float, default=40.0,
                    help="seconds the unread answers are held before the figures are read")
    ap.add_argument("--waves", type=int, default=3,
                    help="times each round's connections are made, the earlier ones kept")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting (repeatable)")
    args = ap.parse_args()
    port = free_port()
    env = app_env(port, args.env)
    waves = " ".join(f"{f'RSS w{w + 1}':>9}" for w in range(args.waves))
    print(f"{'round':<16}{'per wave':>9}{'RSS before':>11}{waves}{'RSS after':>10}  "
          "the held connections got")
    Attack = Callable[[int, str], list[socket.socket]]
    rounds: tuple[tuple[str, float, Attack], ...] = (("stalled bodies", args.hold_bodies,
               lambda port, sid: stalled_bodies(port, sid, args.bodies,
                                                args.body_mb * 1000 * 1000)),
              ("unread answers", args.hold_answers,
               lambda port, sid: unread_answers(port, sid, args.answers)),
              ("wide header", args.hold_bodies,
               lambda port, sid: wide_header(port, sid, args.entries) if args.entries else []))
    for name, hold, attack in rounds:  # (each on a server of its own)
        with app_server(env) as url:
            pid = PIDS[url]
            sid = create(url, int(args.n))
            before = rss_mb(pid)
            held: list[socket.socket] = []
            during = []
            for _ in range(args.waves):  # (the earlier waves' connections kept open)
                sent = attack(port, sid)
                held += sent
                time.sleep(hold)
                during.append(rss_mb(pid))
            got = [outcome(s) for s in held]
            for s in held:
                s.close()
            time.sleep(2)
            print(f"{name:<16}{len(sent):>9}{before:>9}MB"
                  + " ".join(f"{r:>7}MB" for r in during)
                  + f"{rss_mb(pid):>8}MB  {tally(got)}", flush=True)

if __name__ == "__main__":
    main()
