"""Exactly once under retries, against a real ``python -m app`` on 127.0.0.1.

- A sync round open when the server is killed: its waiting pushes fail, nothing was applied;
  after the restart the same workers push again with the same ``Idempotency-Key``s, a third
  worker joins, and exactly one step happens (torch with the mean of the three gradients); a
  further retry of a key is answered (``replayed``) without stepping.
- The SDK behind a TCP proxy that forwards a request, reads the server's whole answer and then
  closes the client's connection without it: ``optserve.Client.step`` and
  ``RemoteOptimizer.step`` retry with the same key and get the replayed answer (one step, equal
  to torch after one step), also when the server is killed and restarted between the apply and
  the retry; a cut create (no id given) makes one session, a cut delete answers without error.
- A key repeated with another body is a 422 ``idempotency_key_reused``.
- A keyed create retried after its session was deleted is a 409 ``session_deleted``, also
  after a kill -9 and restart.
- A retry that reaches the server while its original still runs (after a client-side timeout):
  create (with and without an id), step and delete happen once and the retry gets the answer;
  a sync push's retry joins its round, also when it arrives while that round's step is being
  logged and applied.
- An overwrite while a sync round is open discards it: its workers and their keyed retries get
  409 ``stale_gradient``, live and after a kill -9 and restart; the next round steps the
  overwritten values (torch's values).
"""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

import optserve
from tests.integration.test_durability import Proc, pull
from tests.torch_reference import adam_after as reference_adam_after
from tests.torch_reference import (
    assert_tensors_equal,
    json_tensor,
    make_params,
    to_wire,
    torch_bytes,
)

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
SHAPES = {"w": (3, 4), "b": (4,)}
LR = 0.01
Tensors = dict[str, torch.Tensor]


tensors = partial(make_params, SHAPES)
adam_after = partial(reference_adam_after, lr=LR)


def sessions(c: httpx.Client) -> list[str]:
    return sorted(s["id"] for s in c.get("/v1/sessions").json()["sessions"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = Proc(tmp_path_factory.mktemp("once") / "data")
    try:
        yield p.start()
    finally:
        p.stop()


def restarted_gracefully(server: Proc) -> None:
    """SIGTERM (every session snapshotted on the way out, its log emptied), then a start on
    the same data directory: what follows is restored from the snapshots alone."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0
    server.start()


def stop_with_snapshots(server: Proc) -> None:
    """SIGTERM: every session snapshotted on the way out. A shard's snapshot holding an
    operation its sibling lacks (what a crash between their commits leaves, once a snapshot
    took it) cannot be undone at the next start: the session stays apart until the
    operation's retry completes it."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0


def running(server: Proc) -> Proc:
    if server.proc is None or server.proc.poll() is not None:  # a test before failed mid-kill
        server.start()
    return server


# --------------------------------------------------------------------------- sync round at kill

def push(url: str, sid: str, worker: str, key: str, grads: Tensors) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads),
                      headers={"Content-Type": BINARY, "Accept": BINARY,
                               "X-Optserve-Worker": worker, "Idempotency-Key": key})


def push_all(url: str, sid: str, pushes: list[tuple[str, str, Tensors]]
             ) -> list[httpx.Response | Exception]:
    out: list[httpx.Response | Exception] = [RuntimeError("no answer")] * len(pushes)

    def run(i: int) -> None:
        try:
            out[i] = push(url, sid, *pushes[i])
        except httpx.TransportError as exc:
            out[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pushes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def open_round(c: httpx.Client, url: str, sid: str, p0: dict[str, torch.Tensor],
               g: dict[str, dict[str, torch.Tensor]], keys: dict[str, str],
               sync: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    """An Adam session ``sid`` of ``p0`` in synchronous mode (``sync``), and a round workers
    w1 and w2 pushed to (keyed), waiting for w3: the thread their requests wait in, and the
    list their answers (or errors) land in."""
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": LR}, "sync": sync,
            "params": {n: {"dtype": "float32", "shape": list(t.shape),
                           "data": t.reshape(-1).tolist()} for n, t in p0.items()}}
    assert c.post("/v1/sessions", json=body).status_code == 201
    answers: list[httpx.Response | Exception] = []
    waiting = threading.Thread(target=lambda: answers.extend(push_all(
        url, sid, [(w, keys[w], g[w]) for w in ("w1", "w2")])))
    waiting.start()
    while c.get(f"/v1/sessions/{sid}").json()["sync"].get("pending") != ["w1", "w2"]:
        assert waiting.is_alive(), answers
        time.sleep(0.02)
    return waiting, answers


def round_of_three(url: str, sid: str, p0: dict[str, torch.Tensor],
                   g: dict[str, dict[str, torch.Tensor]], keys: dict[str, str]
                   ) -> dict[str, torch.Tensor]:
    """Workers w1, w2 and w3 push (keyed) to the session's next round: each answer is torch's
    Adam step on the mean of their gradients (returned), at version 1."""
    answers = push_all(url, sid, [(w, keys[w], g[w]) for w in ("w1", "w2", "w3")])
    mean = {n: g["w1"][n].clone().add_(g["w2"][n]).add_(g["w3"][n]).div_(3) for n in p0}
    want = adam_after(p0, mean)
    for a in answers:
        assert isinstance(a, httpx.Response) and a.status_code == 200, a
        assert a.headers["X-Optserve-Version"] == "1"
        assert_tensors_equal(safetensors.torch.load(a.content), want, "round answer")
    return want


def test_a_sync_round_open_at_kill9_steps_once_after_the_restart(server: Proc) -> None:
    server = running(server)
    sid, p0 = "round", tensors(1)
    g = {w: tensors(10 + i) for i, w in enumerate(("w1", "w2", "w3"))}
    keys = {w: f"round-{w}-{time.time_ns()}" for w in g}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # two of three workers push; their requests wait for the round
        waiting, answers = open_round(c, server.url, sid, p0, g, keys, {"workers": 3})
        server.kill9()
        waiting.join(60)
        assert len(answers) == 2 and all(isinstance(a, httpx.TransportError) for a in answers), \
            answers

    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        desc = c.get(f"/v1/sessions/{sid}").json()
        assert (desc["version"], desc["sync"]["pending"]) == (0, [])  # never acknowledged
        # the same two pushes again, same keys, and the third worker
        want = round_of_three(server.url, sid, p0, g, keys)
        version, got = pull(c, sid)
        assert version == 1
        assert_tensors_equal(got, want, "after the round")

        # a third retry of a key after the round: the same result, nothing stepped
        again = push(server.url, sid, "w1", keys["w1"], g["w1"])
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["X-Optserve-Version"] == "1"
        assert_tensors_equal(safetensors.torch.load(again.content), want, "replayed answer")
        assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
        version, got = pull(c, sid)
        assert version == 1
        assert_tensors_equal(got, want, "after the replay")
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_sync_round_open_at_sigterm_is_aborted_at_once_and_retried_after(
        server: Proc) -> None:
    """SIGTERM while a round waits for its third worker: the waiting workers get 409
    ``round_aborted`` at once (not a bare 500 when the 30 s graceful shutdown runs out, as
    before), the server exits 0 without waiting for the round's timeout, and after the restart
    the same pushes (same keys) with the third worker's step once: torch's Adam on the mean."""
    server = running(server)
    sid, p0 = "round-at-sigterm", tensors(2)
    g = {w: tensors(20 + i) for i, w in enumerate(("w1", "w2", "w3"))}
    keys = {w: f"term-{w}-{time.time_ns()}" for w in g}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        waiting, answers = open_round(c, server.url, sid, p0, g, keys,
                                      {"workers": 3, "timeout_s": 600})
    assert server.proc is not None
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    waiting.join(60)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - sent < 20  # not the graceful shutdown's 30 s
    assert len(answers) == 2, answers
    for a in answers:
        assert isinstance(a, httpx.Response) and a.status_code == 409, a
        assert a.json()["code"] == "round_aborted"

    server.start()
    want = round_of_three(server.url, sid, p0, g, keys)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        version, got = pull(c, sid)
        assert version == 1
        assert_tensors_equal(got, want, "after the round")
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize("shards", [1, 2])
def test_a_long_poll_open_at_sigterm_is_answered_at_once(server: Proc, shards: int) -> None:
    """SIGTERM while a worker long-polls for a version the session (plain or sharded) has not
    reached: the poll is answered at once with the current state (200, version 0: check it),
    as at the end of its wait, not a bare 500 when the 30 s graceful shutdown ran out, as
    before; the server exits 0 without waiting for the poll's 60 s."""
    server = running(server)
    sid, p0 = f"poll-at-sigterm-{shards}", tensors(3)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        body = {"id": sid, "optimizer": "SGD", "options": {"lr": LR}, "shards": shards,
                "params": {n: {"dtype": "float32", "shape": list(t.shape),
                               "data": t.reshape(-1).tolist()} for n, t in p0.items()}}
        assert c.post("/v1/sessions", json=body).status_code == 201
        answer: list[httpx.Response | Exception] = []

        def poll() -> None:
            try:
                answer.append(c.get(f"/v1/sessions/{sid}/params?min_version=5&wait_s=60",
                                    headers={"Accept": BINARY}))
            except httpx.HTTPError as exc:
                answer.append(exc)
        polling = threading.Thread(target=poll)
        polling.start()
        time.sleep(1.0)  # (the poll waits for version 5)
        assert polling.is_alive() and not answer
        assert server.proc is not None
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        polling.join(60)
        assert server.proc.wait(60) == 0
        assert time.monotonic() - sent < 20  # not the graceful shutdown's 30 s
    assert len(answer) == 1 and isinstance(answer[0], httpx.Response), answer
    assert answer[0].status_code == 200, answer[0].text
    assert answer[0].headers["X-Optserve-Version"] == "0"
    assert_tensors_equal(safetensors.torch.load(answer[0].content), p0, "polled")
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


# --------------------------------------------------------------------------- the cutting proxy

Cut = Callable[[bytes], bool]


class CuttingProxy:
    """A TCP proxy in front of the server, one request per connection (sent upstream with
    ``Connection: close``, its whole answer relayed), except for the first request whose
    request line matches what :meth:`arm` was given, and that request's retry:

    - ``cut``: the request is forwarded, its answer read to the end, ``on_cut`` runs, and the
      client's connection is closed without a byte of the answer; the retry is relayed;
    - ``overlap``: the request is forwarded but for its last byte and the client's connection
      closed; its retry likewise; then both last bytes go at once, so the server runs the two
      at the same time (as after a client-side timeout); the retry's answer is relayed;
    - ``late``: the request is forwarded and the client's connection closed at once (its answer
      is read and dropped); the retry is held back but for its last byte until
      :attr:`release` is set (:attr:`retry_held` says it is there)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.arm("relay", lambda _line: False)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, target: Cut, on_cut: Callable[[], None] | None = None) -> None:
        self.mode, self.target, self.on_cut = mode, target, on_cut
        self.seen: list[tuple[bytes, str | None]] = []  # request line, Idempotency-Key
        self.answers_dropped: list[bytes] = []
        self.held: socket.socket | None = None
        self.retry_held, self.release = threading.Event(), threading.Event()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            if request is None:
                return
            head, body = request
            line, _, rest = head.partition(b"\r\n")
            headers = [h for h in rest.split(b"\r\n")
                       if h and not h.lower().startswith(b"connection:")]
            key = next((h.split(b":", 1)[1].strip().decode() for h in headers
                        if h.lower().startswith(b"idempotency-key:")), None)
            self.seen.append((line, key))
            upstream = b"\r\n".join([line, *headers, b"Connection: close"]) + b"\r\n\r\n" + body
            if self.mode != "relay" and self.target(line):
                {"cut": self._cut, "overlap": self._overlap, "late": self._late}[self.mode](
                    conn, upstream)
                return
            with socket.create_connection(("127.0.0.1", self.upstream)) as up:
                up.sendall(upstream)
                conn.sendall(_read_to_end(up))

    def _cut(self, conn: socket.socket, upstream: bytes) -> None:
        self.mode = "relay"
        with socket.create_connection(("127.0.0.1", self.upstream)) as up:
            up.sendall(upstream)
            self.answers_dropped.append(_read_to_end(up))
        if self.on_cut is not None:
            self.on_cut()

    def _overlap(self, conn: socket.socket, upstream: bytes) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        up.sendall(upstream[:-1])
        if self.held is None:  # the original: held back, its client left without an answer
            self.held = up
            return
        self.mode, held = "relay", self.held
        with held, up:
            held.sendall(upstream[-1:])
            up.sendall(upstream[-1:])
            self.answers_dropped.append(_read_to_end(held))
            conn.sendall(_read_to_end(up))

    def _late(self, conn: socket.socket, upstream: bytes) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        if self.held is None:  # the original: its answer is read in the background, dropped
            self.held = up
            up.sendall(upstream)

            def drop() -> None:
                with up:
                    self.answers_dropped.append(_read_to_end(up))
            threading.Thread(target=drop, daemon=True).start()
            return
        self.mode = "relay"
        with up:
            up.sendall(upstream[:-1])
            self.retry_held.set()
            self.release.wait(300)
            up.sendall(upstream[-1:])
            conn.sendall(_read_to_end(up))


def _read_request(conn: socket.socket) -> tuple[bytes, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for h in head.split(b"\r\n")[1:]:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


def _read_to_end(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def is_step(line: bytes) -> bool:
    return line.startswith(b"POST ") and b"/step" in line


def is_create(line: bytes) -> bool:
    return line.startswith(b"POST /v1/sessions ")


def is_delete(line: bytes) -> bool:
    return line.startswith(b"DELETE ")


@pytest.fixture
def proxy(server: Proc) -> Iterator[CuttingProxy]:
    p = CuttingProxy(running(server).port)
    try:
        yield p
    finally:
        p.close()


def assert_retried_once_with_the_same_key(proxy: CuttingProxy, what: Cut) -> None:
    """The cut request went twice, with one key, and its first answer was a success."""
    hits = [key for line, key in proxy.seen if what(line)]
    assert len(hits) == 2 and hits[0] is not None and hits[0] == hits[1], proxy.seen
    assert len(proxy.answers_dropped) == 1
    assert proxy.answers_dropped[0].split(b" ", 2)[1].startswith(b"2"), proxy.answers_dropped


# --------------------------------------------------------------------------- SDK retries

def test_sdk_step_cut_after_the_apply_is_answered_not_applied_again(
        server: Proc, proxy: CuttingProxy) -> None:
    p0, g = tensors(2), tensors(3)
    with optserve.Client(proxy.url, timeout=60) as client:
        sid = client.create_session("Adam", dict(p0), options={"lr": LR}).id
        proxy.arm("cut", is_step)
        result = client.step(sid, g)
        assert_retried_once_with_the_same_key(proxy, is_step)
        assert (result.version, result.step, result.replayed) == (1, 1, True)
        want = adam_after(p0, g)
        assert result.params is not None
        assert_tensors_equal(dict(result.params), want, "SDK step answer")
        info = client.get_session(sid)
        assert (info.version, info.step) == (1, 1)
        assert_tensors_equal(dict(client.get_params(sid).params), want, "server params")
        client.delete_session(sid)


def test_remote_optimizer_step_cut_after_the_apply_steps_once(
        server: Proc, proxy: CuttingProxy) -> None:
    p0, g = tensors(4), tensors(5)
    model = {n: t.clone().requires_grad_() for n, t in p0.items()}
    with optserve.Client(proxy.url, timeout=60) as client:
        opt = optserve.RemoteOptimizer(list(model.items()), "Adam", client=client, lr=LR)
        for n, p in model.items():
            p.grad = g[n].clone()
        proxy.arm("cut", is_step)
        opt.step()
        assert_retried_once_with_the_same_key(proxy, is_step)
        want = adam_after(p0, g)
        assert_tensors_equal({n: p.detach() for n, p in model.items()}, want, "local params")
        assert opt.version == 1
        info = client.get_session(opt.session_id)
        assert (info.version, info.step) == (1, 1)
        opt.close(delete_session=True)


def test_sdk_step_retried_after_a_kill9_and_restart_is_answered(
        server: Proc, proxy: CuttingProxy) -> None:
    p0, g = tensors(6), tensors(7)

    def restart() -> None:
        server.kill9()
        server.start()
    # the client waits while the server restarts: a minute on a loaded machine
    with optserve.Client(proxy.url, timeout=300) as client:
        sid = client.create_session("Adam", dict(p0), options={"lr": LR}).id
        proxy.arm("cut", is_step, restart)
        first_pid = server.proc.pid if server.proc else None
        result = client.step(sid, g)
        assert server.proc is not None and server.proc.pid != first_pid
        assert_retried_once_with_the_same_key(proxy, is_step)
        assert (result.version, result.replayed) == (1, True)
        want = adam_after(p0, g)
        assert result.params is not None
        assert_tensors_equal(dict(result.params), want, "answer after the restart")
        info = client.get_session(sid)
        assert (info.version, info.step) == (1, 1)
        assert_tensors_equal(dict(client.get_params(sid).params), want, "server params")
        client.delete_session(sid)


def test_sdk_lbfgs_step_whose_commit_answer_is_lost_to_a_kill9_steps_once(
        server: Proc, proxy: CuttingProxy) -> None:
    """``RemoteOptimizer`` LBFGS: the answer to the evaluation that committed the step is cut
    and the server killed and restarted; the SDK's retry of that evaluation is answered with
    the commit (it was a 404, the step raised, the model kept its values while the session
    held the step's, and the next step went on from parameters never evaluated there). The
    model and the session equal torch's ``LBFGS`` step for step."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(20, 3), torch.nn.Linear(20, 3)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 20), torch.randn(16, 3)
    # (max_iter 2: one evaluation after the opening, whose answer is the commit)
    options = {"lr": 0.5, "max_iter": 2, "history_size": 4}

    def closure(m: torch.nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return run

    def restart() -> None:
        server.kill9()
        server.start()

    def is_evaluation(line: bytes) -> bool:
        return line.startswith(b"POST") and b"/step/" in line

    with optserve.Client(proxy.url, timeout=300, transport="http") as client:
        opt = optserve.RemoteOptimizer(model.parameters(), "LBFGS", client=client, **options)
        ref = torch.optim.LBFGS(twin.parameters(), **options)  # type: ignore[arg-type]
        for k in range(3):
            if k == 1:
                proxy.arm("cut", is_evaluation, restart)
            opt.step(closure(model, opt))
            ref.step(closure(twin, ref))
            got = {n: p.detach() for n, p in model.named_parameters()}
            want = {n: p.detach() for n, p in twin.named_parameters()}
            assert_tensors_equal(got, want, f"the model after step {k + 1}")
            held = client.get_params(opt.session_id).params
            assert_tensors_equal({n: torch.as_tensor(held[str(i)]) for i, n in
                                  enumerate(want)}, want, f"the session after step {k + 1}")
        assert len(proxy.answers_dropped) == 1
        posted = [line for line, _ in proxy.seen if is_evaluation(line)]
        assert len(posted) == len(set(posted)) + 1, posted  # (the cut one, sent again)
        assert client.get_session(opt.session_id).step == 3
        opt.close(delete_session=True)


def test_sdk_create_and_delete_cut_after_the_apply(server: Proc, proxy: CuttingProxy) -> None:
    with optserve.Client(proxy.url, timeout=60) as client, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        before = sessions(c)
        proxy.arm("cut", is_create)
        info = client.create_session("Adam", tensors(8), options={"lr": LR})  # no id given
        assert_retried_once_with_the_same_key(proxy, is_create)
        assert sessions(c) == sorted([*before, info.id])  # one session, not two
        proxy.arm("cut", is_delete)
        client.delete_session(info.id)  # the retry finds it gone: answered, no NotFoundError
        assert_retried_once_with_the_same_key(proxy, is_delete)
        assert sessions(c) == before


def test_a_key_repeated_with_another_request_is_422(server: Proc) -> None:
    server = running(server)
    p0 = tensors(9)
    with httpx.Client(base_url=server.url, timeout=60) as c, \
            optserve.Client(server.url) as client:
        sid = client.create_session("Adam", dict(p0), options={"lr": LR}).id
        headers = {"Content-Type": BINARY, "Idempotency-Key": f"k-{time.time_ns()}"}

        def step(g: Tensors, **extra: Any) -> httpx.Response:
            return c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(g),
                          headers={**headers, **extra})
        g1, g2 = tensors(10), tensors(11)
        assert step(g1).status_code == 200
        for r in (step(g2), step(g1, **{"X-Optserve-Worker": "w9"})):
            assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        r = step(g1)
        assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
        version, got = pull(c, sid)
        assert version == 1
        assert_tensors_equal(got, adam_after(p0, g1), "one step")
        # a create's key is tenant-wide: another body under it is refused too
        key = {"Idempotency-Key": f"c-{time.time_ns()}"}
        body = {"optimizer": "SGD", "options": {"lr": 0.1},
                "params": {"w": {"dtype": "float32", "shape": [1], "data": [1.0]}}}
        made = c.post("/v1/sessions", json=body, headers=key)
        assert made.status_code == 201
        assert c.post("/v1/sessions", json=body, headers=key).json()["id"] == made.json()["id"]
        body["options"] = {"lr": 0.2}
        r = c.post("/v1/sessions", json=body, headers=key)
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        for s in (sid, made.json()["id"]):
            assert c.delete(f"/v1/sessions/{s}").status_code == 204


def test_a_create_retried_after_its_session_was_deleted_is_409_also_after_kill9(
        server: Proc) -> None:
    """A keyed create whose session was deleted is not made again by its retry: 409
    ``session_deleted`` naming the key and the session, live and after a kill -9 and restart
    (the key is in the delete's tombstone); another request under the key is still a 422."""
    server = running(server)
    key = {"Idempotency-Key": f"made-then-deleted-{time.time_ns()}"}
    body = {"optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}

    def retried(c: httpx.Client, sid: str) -> None:
        r = c.post("/v1/sessions", json=body, headers=key)
        assert r.status_code == 409, r.text
        assert r.headers["Content-Type"].startswith("application/problem+json")
        problem = r.json()
        assert (problem["code"], problem["field"], problem["session_id"],
                problem["idempotency_key"]) == ("session_deleted", "Idempotency-Key", sid,
                                                key["Idempotency-Key"]), problem
        other = c.post("/v1/sessions", json={**body, "options": {"lr": 0.2}}, headers=key)
        assert other.status_code == 422, other.text
        assert other.json()["code"] == "idempotency_key_reused"
        assert sid not in sessions(c)

    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = sessions(c)
        made = c.post("/v1/sessions", json=body, headers=key)
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        again = c.post("/v1/sessions", json=body, headers=key)
        assert again.json()["id"] == sid and again.headers["Idempotent-Replayed"] == "true"
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        retried(c, sid)
    server.kill9()
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        retried(c, sid)
        assert sessions(c) == before


@pytest.mark.parametrize("op", ["create", "create-with-id", "step", "delete"])
def test_sdk_retry_running_alongside_its_original_is_answered_once(
        server: Proc, proxy: CuttingProxy, op: str) -> None:
    """The retry reaches the server while the original still runs (as after a client-side
    timeout): one operation all the same, and the retry gets its answer, not an error."""
    p0, g = tensors(12), tensors(13)
    what = {"create": is_create, "create-with-id": is_create, "step": is_step,
            "delete": is_delete}
    with optserve.Client(proxy.url, timeout=60) as client, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        before = sessions(c)
        sid = f"overlap-{time.time_ns()}"
        if op in ("step", "delete"):
            client.create_session("Adam", dict(p0), options={"lr": LR}, id=sid)
            before = sessions(c)
        proxy.arm("overlap", what[op])
        if op.startswith("create"):
            info = client.create_session("Adam", dict(p0), options={"lr": LR},
                                         id=sid if op == "create-with-id" else None)
            sid = info.id
            assert sessions(c) == sorted([*before, sid])  # one session, not two
        elif op == "step":
            result = client.step(sid, g)
            assert result.version == 1
            version, got = pull(c, sid)
            assert version == 1
            assert_tensors_equal(got, adam_after(p0, g), "one step")
        else:
            client.delete_session(sid)
            assert sessions(c) == sorted(set(before) - {sid})
        hits = [key for line, key in proxy.seen if what[op](line)]
        assert len(hits) == 2 and hits[0] == hits[1] and len(proxy.answers_dropped) == 1, \
            (proxy.seen, proxy.answers_dropped)
        if op != "delete":
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204


def test_sync_push_retried_alongside_its_original_joins_its_round(
        server: Proc, proxy: CuttingProxy) -> None:
    """A worker's push and its retry reach the server together: one push in the round, one
    step with both workers' mean, the same answer to the retry."""
    p0, g1, g2 = tensors(14), tensors(15), tensors(16)
    out: dict[str, Any] = {}
    with optserve.Client(proxy.url, timeout=60) as client, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        sid = client.create_session("Adam", dict(p0), options={"lr": LR},
                                    sync={"workers": 2}).id
        proxy.arm("overlap", is_step)

        def worker1() -> None:
            try:
                out["w1"] = client.step(sid, g1, worker="w1")
            except optserve.OptserveError as exc:
                out["w1"] = exc
        t = threading.Thread(target=worker1)
        t.start()
        while len([1 for line, _ in proxy.seen if is_step(line)]) < 2 or \
                c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] != ["w1"]:
            assert t.is_alive(), out
            time.sleep(0.02)
        w2 = push(server.url, sid, "w2", f"w2-{time.time_ns()}", g2)
        t.join(120)
        assert w2.status_code == 200, w2.text
        result = out["w1"]
        assert isinstance(result, optserve.StepResult), result
        assert result.version == 1 and result.sync is not None
        assert result.sync["workers"] == ["w1", "w2"]
        want = adam_after(p0, {n: g1[n].clone().add_(g2[n]).div_(2) for n in p0})
        version, got = pull(c, sid)
        assert version == 1
        assert_tensors_equal(got, want, "one round")
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


def test_sync_push_retried_while_its_round_steps_is_answered_by_that_step(
        server: Proc, proxy: CuttingProxy) -> None:
    """The retry of a worker's push arrives after the round closed, while its step is being
    logged and applied: it gets that step's answer; it does not join the next round."""
    gen = torch.Generator().manual_seed(17)
    p0, g1, g2 = ({"w": torch.randn(1 << 22, generator=gen)} for _ in range(3))
    out: dict[str, Any] = {}
    with optserve.Client(proxy.url, timeout=60) as client, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        sid = client.create_session("Adam", dict(p0), options={"lr": LR},
                                    sync={"workers": 2, "timeout_s": 10}).id
        proxy.arm("late", is_step)

        def worker1() -> None:
            try:
                out["w1"] = client.step(sid, g1, worker="w1", return_params=False)
            except optserve.OptserveError as exc:
                out["w1"] = exc
        t = threading.Thread(target=worker1)
        t.start()
        assert proxy.retry_held.wait(120)
        assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == ["w1"]
        w2: list[httpx.Response] = []
        t2 = threading.Thread(target=lambda: w2.append(push(server.url, sid, "w2", "w2-key",
                                                            g2)))
        t2.start()
        while c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == ["w1"]:
            time.sleep(0.002)
        proxy.release.set()  # the round is closed: its step is being logged and applied
        t.join(120)
        t2.join(120)
        assert w2 and w2[0].status_code == 200, w2
        result = out["w1"]
        assert isinstance(result, optserve.StepResult), result
        assert result.version == 1 and result.sync is not None
        assert result.sync["workers"] == ["w1", "w2"]
        assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
        version, got = pull(c, sid)
        assert version == 1
        want = adam_after(p0, {"w": g1["w"].clone().add_(g2["w"]).div_(2)})
        assert_tensors_equal(got, want, "one round")
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


# --------------------------------------------------------------------------- ?return=touched

def test_a_retried_touched_step_answers_what_its_first_answer_did(server: Proc) -> None:
    """A keyed ``?return=touched`` step retried (live, then after a kill -9 and restart) is
    answered with the parameters and rows its first answer held, not every parameter: a step
    of a sparse and a dense gradient (another parameter has none), and a step onto a sparse
    push (rows the retry's own gradients do not name). Values are torch's: SGD stepped on the
    same sparse and dense gradients in process (a replay answers the current values). The
    replay used to answer every parameter."""
    server = running(server)
    from tests.torch_reference import json_tensor, tensor_from_json
    gen = torch.Generator().manual_seed(40)
    start = {"emb": torch.randn(10, 3, generator=gen), "w": torch.randn(4, generator=gen),
             "other": torch.randn(2, generator=gen)}
    ref = {n: t.clone() for n, t in start.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.1)

    def coo(rows: list[int], values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.tensor(rows).reshape(1, -1), values, (10, 3),
                                       check_invariants=False)

    def sparse(rows: list[int], values: torch.Tensor) -> dict[str, Any]:
        return {"indices": rows, "values": json_tensor(values)}
    rows1, v1, w1 = [1, 5, 1], torch.randn(3, 3, generator=gen), torch.randn(4, generator=gen)
    pushed, v2, w2 = [7, 2], torch.randn(2, 3, generator=gen), torch.randn(4, generator=gen)
    sid, k1, k2 = f"touched-{time.time_ns()}", f"t1-{time.time_ns()}", f"t2-{time.time_ns()}"

    def answered(c: httpx.Client, key: str, grads: dict[str, Any]) -> dict[str, Any]:
        r = c.post(f"/v1/sessions/{sid}/step?return=touched", json={"grads": grads},
                   headers={"Idempotency-Key": key})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def check(body: dict[str, Any], rows: list[int], dense: list[str]) -> None:
        got = body["params"]
        assert sorted(got) == sorted(["emb", *dense]), sorted(got)
        assert got["emb"]["indices"] == rows
        assert torch.equal(tensor_from_json(got["emb"]["values"]), ref["emb"].detach()[rows])
        for n in dense:
            assert torch.equal(tensor_from_json(got[n]), ref[n].detach()), n

    with httpx.Client(base_url=server.url, timeout=60) as c:
        made = c.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                            "options": {"lr": 0.1},
                                            "params": {n: json_tensor(t)
                                                       for n, t in start.items()}})
        assert made.status_code == 201, made.text
        step1 = {"emb": sparse(rows1, v1), "w": json_tensor(w1)}
        first = answered(c, k1, step1)
        ref["emb"].grad, ref["w"].grad = coo(rows1, v1), w1.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        check(first, [1, 5], ["w"])
        again = answered(c, k1, step1)
        assert again.get("replayed") is True and again["version"] == 1
        check(again, [1, 5], ["w"])

        # a sparse push, then a touched step of a dense gradient onto it
        r = c.post(f"/v1/sessions/{sid}/grads", json={"grads": {"emb": sparse(pushed, v2)}})
        assert r.status_code == 200, r.text
        step2 = {"w": json_tensor(w2)}
        second = answered(c, k2, step2)
        ref["emb"].grad, ref["w"].grad = coo(pushed, v2), w2.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        check(second, [2, 7], ["w"])
        again = answered(c, k2, step2)
        assert again.get("replayed") is True and again["version"] == 2
        check(again, [2, 7], ["w"])

    server.kill9()
    server.start()
    for life in ("replayed from the log", "restored from a snapshot"):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for key, grads, rows in ((k1, step1, [1, 5]), (k2, step2, [2, 7])):
                again = answered(c, key, grads)
                assert again.get("replayed") is True, (life, again)
                check(again, rows, ["w"])  # (the current values: version 2)
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == 2, life
            version, got = pull(c, sid)
            assert version == 2
            assert_tensors_equal(got, {n: t.detach() for n, t in ref.items()}, life)
        if life == "replayed from the log":
            restarted_gracefully(server)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


# --------------------------------------------------------------------------- overwrite in a round

def keyed_push(url: str, sid: str, worker: str, key: str, grads: Tensors,
               base_version: int | None = None) -> httpx.Response:
    query = "" if base_version is None else f"?base_version={base_version}"
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post(f"/v1/sessions/{sid}/step{query}", content=safetensors.torch.save(grads),
                      headers={"Content-Type": BINARY, "Accept": BINARY,
                               "X-Optserve-Worker": worker, "Idempotency-Key": key})


def test_an_overwrite_discards_the_open_round_live_and_after_a_kill9(server: Proc) -> None:
    """Two of three workers wait in a round (one with ``?base_version=1``, one without) when
    ``PUT .../params`` lands: both get 409 ``stale_gradient`` (``current_version`` the
    overwrite's version, ``base_version`` their own), and so do their keyed retries, live and
    after a kill -9 and restart; nothing of theirs is ever stepped. The third worker's push
    then opens a new round, which steps the overwritten values with the gradients gathered
    after the overwrite only: equal to torch (one round, the overwrite copied in, one
    round). The overwrite used to leave the round open, and its step applied gradients of
    parameters that no longer existed."""
    server = running(server)
    sid, p0, p1 = f"overwrite-{time.time_ns()}", tensors(20), tensors(21)
    r0 = {w: tensors(30 + i) for i, w in enumerate(("w1", "w2", "w3"))}
    stale = {w: tensors(40 + i) for i, w in enumerate(("w1", "w2"))}
    fresh = {w: tensors(50 + i) for i, w in enumerate(("w1", "w2", "w3"))}
    keys = {w: f"{sid}-stale-{w}" for w in stale}

    def mean(gs: list[Tensors]) -> Tensors:
        out = {n: gs[0][n].clone() for n in SHAPES}
        for g in gs[1:]:
            for n in SHAPES:
                out[n].add_(g[n])
        return {n: t.div_(len(gs)) for n, t in out.items()}

    # the torch mirror: one round, the overwrite copied in, one round after it
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam(list(local.values()), lr=LR)
    for g in (mean([r0[w] for w in sorted(r0)]), None, mean([fresh[w] for w in sorted(fresh)])):
        if g is None:
            with torch.no_grad():
                for n, p in local.items():
                    p.copy_(p1[n])
            continue
        for n, p in local.items():
            p.grad = g[n].clone()
        opt.step()

    def check_discarded(r: httpx.Response | Exception, base: int) -> None:
        assert isinstance(r, httpx.Response) and r.status_code == 409, r
        body = r.json()
        assert (body["code"], body["field"], body["current_version"], body["base_version"]) \
            == ("stale_gradient", "base_version", 2, base), body

    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
                "sync": {"workers": 3, "timeout_s": 120},
                "params": {n: {"dtype": "float32", "shape": list(t.shape),
                               "data": t.reshape(-1).tolist()} for n, t in p0.items()}}
        assert c.post("/v1/sessions", json=body).status_code == 201
        first = push_all(server.url, sid, [(w, f"{sid}-r0-{w}", r0[w]) for w in r0])
        assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in first), first

        answers: dict[str, httpx.Response | Exception] = {}

        def wait_in_round(w: str, base: int | None) -> None:
            try:
                answers[w] = keyed_push(server.url, sid, w, keys[w], stale[w], base)
            except httpx.TransportError as exc:
                answers[w] = exc
        waiting = [threading.Thread(target=wait_in_round, args=("w1", 1)),
                   threading.Thread(target=wait_in_round, args=("w2", None))]
        for t in waiting:
            t.start()
        while c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] != ["w1", "w2"]:
            assert all(t.is_alive() for t in waiting), answers
            time.sleep(0.02)
        put = c.put(f"/v1/sessions/{sid}/params", content=safetensors.torch.save(p1),
                    headers={"Content-Type": BINARY})
        assert put.status_code == 200, put.text
        assert put.headers["X-Optserve-Version"] == "2"
        for t in waiting:
            t.join(60)
        check_discarded(answers.get("w1", RuntimeError("no answer")), 1)
        check_discarded(answers.get("w2", RuntimeError("no answer")), 1)
        assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []

        # keyed retries: the same answer, and nothing joins a round
        check_discarded(keyed_push(server.url, sid, "w1", keys["w1"], stale["w1"], 1), 1)
        check_discarded(keyed_push(server.url, sid, "w2", keys["w2"], stale["w2"]), 1)
        assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
        version, got = pull(c, sid)
        assert version == 2
        assert_tensors_equal(got, p1, "the overwritten values")

        # the third worker opens a new round; the others push gradients of the new values
        after = push_all(server.url, sid, [(w, f"{sid}-fresh-{w}", fresh[w]) for w in fresh])
        for a in after:
            assert isinstance(a, httpx.Response) and a.status_code == 200, a
            assert a.headers["X-Optserve-Version"] == "3"
            assert_tensors_equal(safetensors.torch.load(a.content), local, "round answer")

    server.kill9()
    server.start()
    for life in ("replayed from the log", "restored from a snapshot"):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            version, got = pull(c, sid)
            assert version == 3
            assert_tensors_equal(got, local, f"after the restart ({life})")
            check_discarded(keyed_push(server.url, sid, "w1", keys["w1"], stale["w1"], 1), 1)
            check_discarded(keyed_push(server.url, sid, "w2", keys["w2"], stale["w2"]), 1)
            again = keyed_push(server.url, sid, "w3", f"{sid}-fresh-w3", fresh["w3"])
            assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
            desc = c.get(f"/v1/sessions/{sid}").json()
            assert (desc["version"], desc["sync"]["pending"]) == (3, [])
            version, got = pull(c, sid)
            assert version == 3
            assert_tensors_equal(got, local, f"after the retries ({life})")
        if life == "replayed from the log":
            restarted_gracefully(server)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize("shards", [None, 2])
def test_a_retried_delete_leaves_the_session_made_again_under_its_id_alone(
        server: Proc, shards: int | None) -> None:
    """A keyed delete, the session made again under the same id, then the delete retried
    (its answer was lost): 204, and the new session is left whole, live and after a kill -9
    and restart: its values, and its own create's retry answered with it. A sharded session's
    retried delete went on to the new session: its directory entry removed (404) with its
    shards left on disk, and its create's key marked deleted."""
    server = running(server)
    sid = f"again-{shards}-{time.time_ns()}"
    start = tensors(1)
    body: dict[str, Any] = {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
                            "params": {n: json_tensor(t) for n, t in start.items()}}
    if shards is not None:
        body["shards"] = shards
    create1, create2 = ({"Idempotency-Key": f"{sid}-c{i}"} for i in (1, 2))
    delete1 = {"Idempotency-Key": f"{sid}-d1"}
    grads = tensors(2)
    local = adam_after(start, grads)

    def whole(c: httpx.Client) -> None:
        version, got = pull(c, sid)
        assert version == 2  # (made again at 1: past the deleted session's 0)
        assert_tensors_equal(got, local, f"{sid} made again")
        again = c.post("/v1/sessions", json=body, headers=create2)
        assert again.status_code == 201, again.text
        assert again.headers["Idempotent-Replayed"] == "true"

    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/sessions", json=body, headers=create1).status_code == 201
        assert c.delete(f"/v1/sessions/{sid}", headers=delete1).status_code == 204
        assert c.post("/v1/sessions", json=body, headers=create2).status_code == 201
        r = c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads),
                   headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        retried = c.delete(f"/v1/sessions/{sid}", headers=delete1)
        assert retried.status_code == 204, retried.text
        whole(c)
    server.kill9()
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        retried = c.delete(f"/v1/sessions/{sid}", headers=delete1)
        assert retried.status_code == 204, retried.text
        whole(c)
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize("fmt", ["json", "torch"])
def test_an_import_that_reached_one_shard_only_is_completed_by_its_retry(
        server: Proc, fmt: str) -> None:
    """A keyed state import into a sharded session that a crash cut between its shards'
    commits, where a snapshot of the shard that took it holds it (so the start cannot undo
    it), is completed by the client's retry with the same key, as the docs promise, and the
    session is torch's after the import. With ``?format=torch`` the retry was a 503
    ``shards_out_of_step`` for good (the route described the session, to size the file,
    before the import could complete it): the session went out of service."""
    from tests.integration.test_crash_every_mutation import Mirror, check_session

    server = running(server)
    sid = f"cut-import-{fmt}-{time.time_ns()}"
    start = tensors(3)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        made = c.post("/v1/sessions", json={
            "id": sid, "optimizer": "Adam", "options": {"lr": LR}, "shards": 2,
            "params": {n: json_tensor(t) for n, t in start.items()}})
        assert made.status_code == 201, made.text
        m = Mirror("Adam", [(start, {})], {"lr": LR})
        grads = tensors(4)
        r = c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads),
                   headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        m.step(grads)
    server.kill9()
    shard = server.data_dir / "sessions" / f"default#{sid}~shard1of2"
    before = server.data_dir.parent / f"{sid}-shard1-before"
    shutil.copytree(shard, before)
    server.start()
    donor = Mirror("Adam", [(tensors(5), {})], {"lr": LR})
    for seed in (6, 7):
        donor.step(tensors(seed))
    sd = donor.state()
    key = {"Idempotency-Key": f"{sid}-import"}
    kwargs: dict[str, Any] = (
        {"json": to_wire(sd)} if fmt == "json" else
        {"content": torch_bytes(sd), "params": {"format": "torch"},
         "headers": {"Content-Type": BINARY, **key}})
    kwargs.setdefault("headers", key)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.put(f"/v1/sessions/{sid}/state_dict", **kwargs)
        assert r.status_code == 200, r.text
    stop_with_snapshots(server)
    shutil.rmtree(shard)
    shutil.copytree(before, shard)  # (the import reached shard 0 only, now in its snapshot)
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        apart = c.get(f"/v1/sessions/{sid}")
        assert apart.status_code == 503 and apart.json()["code"] == "shards_out_of_step"
        r = c.put(f"/v1/sessions/{sid}/state_dict", **kwargs)
        assert r.status_code == 200, r.text
        m.import_state(sd)
        check_session(c, sid, m)
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


def test_an_option_change_that_reached_one_shard_only_is_seen_and_completed(
        server: Proc) -> None:
    """A keyed ``PATCH .../param_groups/0`` of a sharded session that a crash cut between its
    shards' commits, where a snapshot of the shard that took it holds it (so the start cannot
    undo it), moves one shard's revision, not its version. The shards are apart as after a
    cut step: reads are a retryable 503 ``shards_out_of_step`` until the client's retry with
    the same key completes the change, and then every shard steps with the new lr (torch's
    values). The shards' versions were all that was compared: the session was served as if
    whole, described with the first shard's lr while the other shard stepped with the old
    one."""
    from tests.integration.test_crash_every_mutation import Mirror, check_session

    server = running(server)
    sid = f"cut-patch-{time.time_ns()}"
    start = tensors(8)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        made = c.post("/v1/sessions", json={
            "id": sid, "optimizer": "Adam", "options": {"lr": LR}, "shards": 2,
            "params": {n: json_tensor(t) for n, t in start.items()}})
        assert made.status_code == 201, made.text
    m = Mirror("Adam", [(start, {})], {"lr": LR})
    server.kill9()
    shard = server.data_dir / "sessions" / f"default#{sid}~shard1of2"
    before = server.data_dir.parent / f"{sid}-shard1-before"
    shutil.copytree(shard, before)
    server.start()
    change = {"lr": 0.5}
    key = {"Idempotency-Key": f"{sid}-patch"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.patch(f"/v1/sessions/{sid}/param_groups/0", json=change, headers=key)
        assert r.status_code == 200, r.text
    stop_with_snapshots(server)
    shutil.rmtree(shard)
    shutil.copytree(before, shard)  # (the change reached shard 0 only, now in its snapshot)
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        apart = c.get(f"/v1/sessions/{sid}")
        assert apart.status_code == 503, apart.text
        assert apart.json()["code"] == "shards_out_of_step"
        r = c.patch(f"/v1/sessions/{sid}/param_groups/0", json=change, headers=key)
        assert r.status_code == 200, r.text
        m.opt.param_groups[0].update(change)
        grads = tensors(9)
        r = c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads),
                   headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        m.step(grads)
        check_session(c, sid, m)
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
