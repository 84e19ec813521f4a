"""The server-wide bound on request bodies held at once (``OPTSERVE_MAX_BODIES_MB``), against a
real uvicorn on 127.0.0.1 with the server's own HTTP protocol, over raw sockets and the SDK.

Without it, clients that send most of many large bodies and then stall (a byte now and then,
inside the body timeout) made the server hold every one of them, past its memory. Here the
bound is 2 MiB and each step body is about 800 KB: two bodies held mid-way leave no room for
a third, which waits (not read) and steps once one of them is answered, in the order torch
would; one that finds no room within the body timeout is a 503 ``server_bodies_full`` that
changes nothing, and the SDK's retry steps once room is made. Every answer's parameters equal
an in-process ``torch.optim`` run's, bit for bit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import httpx
import orjson
import pytest
import torch
from safetensors.torch import save as st_save

import optserve
from app.api import body_memory
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_malformed_http import Answers, connect
from tests.integration.test_many_bindings_few_descriptors import gauge, wait_for
from tests.torch_reference import Reference, assert_tensors_equal, json_tensor, tensor_from_json

pytestmark = pytest.mark.integration

N = 200_000  # 800 KB of float32 a body: past bodies.OFFLOAD_BYTES, so counted
BOUND_MB = 2  # two such bodies fit, three do not
TIMEOUT_S = 3.0  # OPTSERVE_BODY_TIMEOUT_S: how long a body waits for room
OPTIONS = {"lr": 1e-2}


@pytest.fixture
def url() -> Iterator[str]:
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=BOUND_MB,
                                     body_timeout_s=TIMEOUT_S))
    with live.serving() as started:
        yield started


def grads(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed))


def session(url: str, n: int = N) -> tuple[str, Reference]:
    """A session made from a safetensors body (a JSON one this large counts 18 times its size:
    past the bound here)."""
    init = torch.randn(n, generator=torch.Generator().manual_seed(0))
    with optserve.Client(url, transport="http") as client:
        info = client.create_session("Adam", {"w": init}, options=OPTIONS, durability="memory")
    return info.id, Reference(torch.optim.Adam, [({"w": init}, {})], OPTIONS)


def step_head(sid: str, size: int, extra: str = "") -> bytes:
    return (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/octet-stream\r\nAccept: application/json\r\n"
            f"Content-Length: {size}\r\n{extra}\r\n").encode()


class Held:
    """A step whose body is sent half-way, then a byte at a time on :meth:`trickle` (inside
    the body timeout): it holds its body's bytes on the server."""

    def __init__(self, url: str, sid: str, grad: torch.Tensor) -> None:
        self.body = st_save({"w": grad})
        self.sent = len(self.body) // 2
        self.sock = connect(url)
        self.sock.sendall(step_head(sid, len(self.body)) + self.body[:self.sent])

    def trickle(self) -> None:
        self.sock.sendall(self.body[self.sent:self.sent + 1])
        self.sent += 1

    def finish(self) -> tuple[int, dict[str, object]]:
        self.sock.sendall(self.body[self.sent:])
        status, _, body = Answers(self.sock).next()
        self.sock.close()
        return status, orjson.loads(body)


class Trickling:
    """Keeps held steps alive (a byte each every 0.3 s) until stopped."""

    def __init__(self, held: list[Held]) -> None:
        self.held = held
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            for h in self.held:
                h.trickle()

    def __enter__(self) -> Trickling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def params_of(answer: dict[str, object]) -> dict[str, torch.Tensor]:
    params = answer["params"]
    assert isinstance(params, dict)
    return {k: tensor_from_json(v) for k, v in params.items()}


def version(url: str, sid: str) -> int:
    got: int = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30).json()["version"]
    return got


def test_a_body_past_the_bound_waits_unread_and_steps_when_room_is_made(url: str) -> None:
    sid, ref = session(url)
    a, b = Held(url, sid, grads(1)), Held(url, sid, grads(2))
    size = len(a.body)
    third: dict[str, httpx.Response] = {}

    def post() -> None:
        third["r"] = httpx.post(f"{url}/v1/sessions/{sid}/step", content=st_save({"w": grads(3)}),
                                headers={"Content-Type": "application/octet-stream"},
                                timeout=60)
    thread = threading.Thread(target=post)
    # (both held bodies kept alive until they are finished: on a loaded machine the steps
    # below took longer than the body timeout, and the held body answered 408)
    with Trickling([b]):
        with Trickling([a]):
            assert gauge(url, "optserve_request_body_bytes_limit") == BOUND_MB << 20
            wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 2 * size,
                     "the two held bodies counted")
            thread.start()
            wait_for(lambda: gauge(url, "optserve_request_bodies_waiting") == 1,
                     "the third body waiting for room")
            assert gauge(url, "optserve_request_body_bytes") == 2 * size
            assert version(url, sid) == 0

        # the first held body completes: answered, and its bytes let the third one in
        status, answer = a.finish()
        assert status == 200, answer
        ref.step({"w": grads(1)})
        assert_tensors_equal(params_of(answer), ref.params, "the first held step")
        thread.join(timeout=60)
        assert third["r"].status_code == 200, third["r"].text
        ref.step({"w": grads(3)})
        assert_tensors_equal(params_of(third["r"].json()), ref.params, "the step that waited")

    status, answer = b.finish()
    assert status == 200, answer
    ref.step({"w": grads(2)})
    assert_tensors_equal(params_of(answer), ref.params, "the second held step")
    assert version(url, sid) == 3
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 0, "every body given back")
    assert gauge(url, "optserve_request_bodies_waiting") == 0


def test_a_body_that_finds_no_room_in_time_is_a_503_and_changes_nothing(
        url: str, caplog: pytest.LogCaptureFixture) -> None:
    sid, ref = session(url)
    held = [Held(url, sid, grads(1)), Held(url, sid, grads(2))]
    size = len(held[0].body)
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 2 * size,
             "the two held bodies counted")
    with Trickling(held):
        body = st_save({"w": grads(3)})
        with connect(url) as sock:
            sock.sendall(step_head(sid, len(body)) + body)
            status, headers, raw = Answers(sock).next()
        assert status == 503, raw
        assert headers["content-type"] == "application/problem+json"
        assert headers["retry-after"] == "1"
        problem = orjson.loads(raw)
        assert problem["code"] == "server_bodies_full" and problem["field"] == "body", problem
        assert problem["limit_bytes"] == BOUND_MB << 20
        assert problem["held_bytes"] == 2 * size
        assert problem["needed_bytes"] == len(body)
        assert "OPTSERVE_MAX_BODIES_MB" in problem["detail"]
        # a bound reached is no fault of the server's: a warning in its log, not an error
        logged = [r for r in caplog.records if "server_bodies_full" in r.getMessage()]
        assert logged and all(r.levelno == logging.WARNING for r in logged), logged

        # a body of no announced size takes its bytes as they come, without waiting
        chunked = (step_head(sid, 0).replace(b"Content-Length: 0\r\n",
                                             b"Transfer-Encoding: chunked\r\n")
                   + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        with connect(url) as sock:
            sock.sendall(chunked)
            status, headers, raw = Answers(sock).next()
        assert status == 503, raw
        assert orjson.loads(raw)["code"] == "server_bodies_full"
        assert version(url, sid) == 0
        assert gauge(url, "optserve_request_body_bytes") == 2 * size

        # the SDK retries the 503; the held steps' clients go away (nothing applied), and
        # the retry steps
        client = optserve.Client(url, transport="http", max_retries=8)
        result: dict[str, object] = {}

        def sdk_step() -> None:
            result["r"] = client.step(sid, {"w": grads(3)}, binary=True)
        thread = threading.Thread(target=sdk_step)
        thread.start()
        refused = gauge(url, 'optserve_http_requests_total{method="POST",status="503"}')
        wait_for(lambda: gauge(url, 'optserve_http_requests_total{method="POST",status="503"}')
                 > refused, "the SDK's first attempt refused", timeout=TIMEOUT_S * 4)
    for h in held:
        h.sock.close()
    thread.join(timeout=60)
    client.close()
    ref.step({"w": grads(3)})
    got = result["r"]
    assert isinstance(got, optserve.StepResult)
    assert_tensors_equal({k: torch.as_tensor(v) for k, v in got.params.items()}, ref.params,
                         "the SDK's retried step")
    assert version(url, sid) == 1
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 0, "every body given back")


def padded_body(grad: torch.Tensor, header_bytes: int) -> bytes:
    """A safetensors body of ``grad`` whose header is padded (with spaces, as the format
    allows) to ``header_bytes``."""
    body = st_save({"w": grad})
    n = int.from_bytes(body[:8], "little")
    assert header_bytes >= n and header_bytes % 8 == 0
    return (header_bytes.to_bytes(8, "little") + body[8:8 + n] + b" " * (header_bytes - n)
            + body[8 + n:])


def test_what_decoding_may_take_counts_a_json_body_18_times_and_a_header_32_times(
        url: str) -> None:
    sid, ref = session(url)
    limit = BOUND_MB << 20

    # a JSON step of 320 KB may take 18 times that to decode: past the bound on its own,
    # a 413 at once naming the bytes (not a wait)
    small, small_ref = session(url, 60_000)
    body = orjson.dumps({"grads": {"w": json_tensor(grads(5)[:60_000], b64=True)}})
    assert body_memory.JSON_EXPANSION == 18 and 18 * len(body) > limit
    r = httpx.post(f"{url}/v1/sessions/{small}/step", content=body,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    problem = r.json()
    assert problem["code"] == "payload_too_large" and problem["field"] == "body", problem
    assert problem["needed_bytes"] == 18 * len(body) and problem["limit"] == limit
    assert "safetensors" in problem["detail"]
    assert version(url, small) == 0
    # the same gradient as safetensors: stepped, equal to torch
    r = httpx.post(f"{url}/v1/sessions/{small}/step", content=st_save({"w": grads(5)[:60_000]}),
                   headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 200, r.text
    small_ref.step({"w": grads(5)[:60_000]})
    assert_tensors_equal(params_of(r.json()), small_ref.params, "the safetensors step")

    # a header of 72 KiB may take 32 times that to parse: with the body, past the bound
    big = padded_body(grads(6), 72 * 1024)
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", content=big,
                   headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["needed_bytes"] == len(big) + 32 * 72 * 1024
    # one of 16 KiB fits (512 KiB counted with its 800 KB body)...
    body = padded_body(grads(6), 16 * 1024)
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", content=body,
                   headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 200, r.text
    ref.step({"w": grads(6)})
    assert_tensors_equal(params_of(r.json()), ref.params, "the padded header's step")
    # ...but not beside two held bodies: its header's share is taken without waiting (the
    # body is read by then), so a 503 at once, and nothing applied
    held = [Held(url, sid, grads(1)), Held(url, sid, grads(2))]
    size = len(held[0].body)
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 2 * size,
             "the two held bodies counted")
    with Trickling(held):
        with connect(url) as sock:
            # (the body itself fits: the bound less the two held ones leaves 497 KB)
            small_body = padded_body(grads(7)[:60_000], 16 * 1024)
            assert 2 * size + len(small_body) <= limit
            assert 2 * size + len(small_body) + 32 * 16 * 1024 > limit
            sock.sendall(step_head(small, len(small_body)) + small_body)
            status, headers, raw = Answers(sock).next()
        assert status == 503, raw
        assert orjson.loads(raw)["code"] == "server_bodies_full"
        assert version(url, small) == 1
    for h in held:
        h.sock.close()
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 0, "every body given back")


def test_a_json_body_of_many_small_tensors_counts_each_object() -> None:
    """A JSON body of one-element tensors takes about 33 times its size to decode (each
    tensor's dict, strings and lists, and the tensor): it counted 10 times. Each ``{`` now
    counts 2 KB on top of 18 times the size: 300 KB of them, within 18 times its size of an
    8 MiB bound, is a 413 naming what its objects need, and nothing is applied; a JSON body
    as large of one tensor steps, equal to torch."""
    bound = 8 << 20
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=bound >> 20,
                                     body_timeout_s=TIMEOUT_S))
    with live.serving() as url:
        n = 6_000
        init = torch.randn(n, generator=torch.Generator().manual_seed(0))
        with optserve.Client(url, transport="http") as client:
            info = client.create_session("Adam", {f"p{i}": init[i:i + 1] for i in range(n)},
                                         options=OPTIONS, durability="memory")
        g = grads(3)[:n]
        body = orjson.dumps({"grads": {f"p{i}": json_tensor(g[i:i + 1]) for i in range(n)}})
        assert 300_000 < len(body) and 18 * len(body) < bound
        objects = body.count(b"{")
        assert objects * body_memory.JSON_OBJECT_BYTES > bound
        assert _refused_whole(url, info.id, body, bound) == 18 * len(body) + _structure(body)
        # a JSON body as large of one tensor (three objects) fits: stepped, equal to torch
        m = 20_000
        w0 = torch.randn(m, generator=torch.Generator().manual_seed(1))
        with optserve.Client(url, transport="http") as client:
            one = client.create_session("Adam", {"w": w0}, options=OPTIONS,
                                        durability="memory").id
        _json_step_as_torch(url, one, w0, grads(4)[:m], bound)


def _structure(body: bytes) -> int:
    """What a large JSON body's ``{``, ``[`` and ``"`` count on top of 18 times its size."""
    return sum(body.count(byte) * cost for byte, cost in body_memory.JSON_STRUCTURE_BYTES)


def test_a_json_body_of_empty_lists_counts_each_list() -> None:
    """A million ``[[]],`` took 38 times their size to decode, past the 18 times counted:
    each ``[`` now counts 64 bytes on top. Such a body, within 18 times its size of the bound,
    is a 413 naming what its lists need, and nothing is applied; as large a body of numbers
    steps, equal to torch."""
    bound = 8 << 20
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=bound >> 20,
                                     body_timeout_s=TIMEOUT_S))
    with live.serving() as url:
        m = 20_000
        w0 = torch.randn(m, generator=torch.Generator().manual_seed(2))
        with optserve.Client(url, transport="http") as client:
            sid = client.create_session("Adam", {"w": w0}, options=OPTIONS,
                                        durability="memory").id
        lists = 90_000
        body = (b'{"grads":{"w":{"dtype":"float32","shape":[%d],"data":[' % m
                + b",".join([b"[[]]"] * lists) + b"]}}}")
        assert 18 * len(body) < bound < 18 * len(body) + _structure(body)
        assert body.count(b"[") == 2 * lists + 2
        assert _refused_whole(url, sid, body, bound) == 18 * len(body) + _structure(body)
        _json_step_as_torch(url, sid, w0, grads(5)[:m], bound)


def test_a_json_body_that_fits_by_parts_but_not_in_all_is_a_413() -> None:
    """A JSON body whose 18 times its size fits the bound, and whose lists' count fits it too,
    but not both together, can never be decoded here: a 413 naming all it needs (it was a 503
    ``server_bodies_full``, which the SDKs retry, each retry refused the same), nothing
    applied, and no bytes left held; a body of numbers as large steps, equal to torch."""
    bound = 8 << 20
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=bound >> 20,
                                     body_timeout_s=TIMEOUT_S))
    with live.serving() as url:
        m = 20_000
        w0 = torch.randn(m, generator=torch.Generator().manual_seed(3))
        with optserve.Client(url, transport="http") as client:
            sid = client.create_session("Adam", {"w": w0}, options=OPTIONS,
                                        durability="memory").id
        body = (b'{"grads":{"w":{"dtype":"float32","shape":[%d],"data":[' % m
                + b",".join([b"[[]]"] * 60_000) + b"]}}}")
        needed = 18 * len(body) + _structure(body)
        assert len(body) > 256 * 1024 and 18 * len(body) < bound
        assert _structure(body) < bound < needed
        assert _refused_whole(url, sid, body, bound) == needed
        _json_step_as_torch(url, sid, w0, grads(6)[:m], bound)


def _refused_whole(url: str, sid: str, body: bytes, bound: int) -> int:
    """``body`` stepped as JSON is a 413 ``payload_too_large`` against ``bound``, nothing
    applied and every byte given back; the bytes it said the body needs."""
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    problem = r.json()
    assert problem["code"] == "payload_too_large" and problem["limit"] == bound
    assert version(url, sid) == 0
    wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 0, "the body given back")
    needed: int = problem["needed_bytes"]
    return needed


def _json_step_as_torch(url: str, sid: str, w0: torch.Tensor, grad: torch.Tensor,
                        bound: int) -> None:
    """A JSON body of one large tensor (above 300 KB, within ``bound`` as counted) steps the
    one-tensor Adam session ``sid`` (created from ``w0``) as torch does."""
    body = orjson.dumps({"grads": {"w": json_tensor(grad)}})
    assert len(body) > 300_000 and 18 * len(body) + _structure(body) < bound
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    ref = Reference(torch.optim.Adam, [({"w": w0}, {})], OPTIONS)
    ref.step({"w": grad})
    assert_tensors_equal(params_of(r.json()), ref.params, "the one-tensor JSON step")


def _deflated(obj: object) -> bytes:
    """``torch.save`` of ``obj``, its zip entries deflated (torch's reader inflates them)."""
    import io
    import zipfile
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as zin, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for entry in zin.infolist():
            zout.writestr(entry.filename, zin.read(entry.filename))
    return out.getvalue()


def test_a_torch_file_counts_what_it_expands_to() -> None:
    """A ``torch.save`` import counts, as a body, what torch's reader inflates it to: a file of
    deflated zeros is about a thousandth of that. The session's own bound on such a file
    grows with what its state may hold, and an LBFGS session's with its ``history_size``
    (10**9 here: 32 GB for four parameters), so a small file could make the server allocate
    past its memory. Here 17 KB expanding to 16 MB, past an 8 MiB bound, is a 413 naming what
    it needs, and the session is left as it was; its own export still imports."""
    bound = 8 << 20
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=bound >> 20,
                                     body_timeout_s=TIMEOUT_S))
    options = {"lr": 0.5, "history_size": 10**9}
    w0 = torch.randn(4, generator=torch.Generator().manual_seed(5))
    with live.serving() as url, optserve.Client(url, transport="http") as client:
        sid = client.create_session("LBFGS", {"w": w0}, options=options,
                                    durability="memory").id
        before = httpx.get(f"{url}/v1/sessions/{sid}/state_dict", timeout=30).json()
        body = _deflated({"state": {0: {"d": torch.zeros(4_000_000)}},
                          "param_groups": [{**options, "params": [0]}]})
        assert len(body) < 100_000
        r = httpx.put(f"{url}/v1/sessions/{sid}/state_dict", params={"format": "torch"},
                      content=body, headers={"Content-Type": "application/octet-stream"},
                      timeout=60)
        assert r.status_code == 413, r.text
        problem = r.json()
        assert problem["code"] == "payload_too_large" and problem["limit"] == bound
        assert problem["needed_bytes"] >= 16_000_000
        assert httpx.get(f"{url}/v1/sessions/{sid}/state_dict", timeout=30).json() == before
        wait_for(lambda: gauge(url, "optserve_request_body_bytes") == 0, "the body given back")
        own = httpx.get(f"{url}/v1/sessions/{sid}/state_dict", params={"format": "torch"},
                        timeout=30).content
        r = httpx.put(f"{url}/v1/sessions/{sid}/state_dict", params={"format": "torch"},
                      content=own, headers={"Content-Type": "application/octet-stream"},
                      timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/v1/sessions/{sid}/state_dict", timeout=30).json() == before
        got = httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=30).json()
        assert torch.equal(tensor_from_json(got["params"]["w"]), w0)
