"""The SDK's narrowed pulls: ``Client.get_params(..., params_dtype=...)`` (and the async
client's), and a ``RemoteOptimizer(..., wire_dtype=...)`` worker whose join and
``pull_params()`` take the session's values narrowed on the wire (about half the bytes of a
float32 pull, counted with an httpx response hook) and hold the same values, bit for bit, as the
local narrowing the SDK did before the server could narrow a pull: each narrowed parameter
``m.to(wire).to(m.dtype)`` of the session's float32 values ``m``, except (float16) a parameter
that would narrow to an infinity, which keeps ``m``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch
from torch import nn

import optserve

pytestmark = pytest.mark.integration


class Counted:
    """The ``GET .../params`` answers a client received: their query and ``Content-Length``."""

    def __init__(self) -> None:
        self.pulls: list[tuple[dict[str, list[str]], int]] = []

    def __call__(self, response: httpx.Response) -> None:
        request = response.request
        if request.method == "GET" and request.url.path.endswith("/params"):
            query: dict[str, list[str]] = {}
            for k, v in request.url.params.multi_items():
                query.setdefault(k, []).append(v)
            self.pulls.append((query, int(response.headers["content-length"])))


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))


def as_narrowed_before(master: dict[str, torch.Tensor], wire: torch.dtype
                       ) -> dict[str, torch.Tensor]:
    """What a wire_dtype worker held after a pull before this change: the SDK's own local
    narrowing of a full-width pull (float32 parameters; one holding a value past float16's
    range kept whole at float32)."""
    out = {}
    for name, m in master.items():
        narrow = m.to(wire)
        keep = wire == torch.float16 and bool(torch.isinf(narrow).any())
        out[name] = m if keep else narrow.to(m.dtype)
    return out


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert got[n].dtype == w.dtype, n
        assert torch.equal(got[n].view(torch.int32), w.view(torch.int32)), n


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_get_params_narrowed_sync_and_async(live_server: str, client: optserve.Client,
                                            wire: str) -> None:
    dtype = getattr(torch, wire)
    sid = f"sdk-narrowpull-{uuid.uuid4().hex[:8]}"
    params = {n: p.detach().clone() for n, p in model().named_parameters()}
    params["0.bias"][:2] = torch.tensor([7e4, -1e5])  # past float16's range
    client.create_session("Adam", params=params, id=sid, options={"lr": 1e-2})
    for binary in (True, False):
        got = client.get_params(sid, binary=binary, params_dtype=wire)
        assert got.version == 0
        for n, m in params.items():
            assert got.params[n].dtype == dtype
            assert torch.equal(got.params[n].view(torch.int16), m.to(dtype).view(torch.int16))

    async def pull() -> optserve.ParamsResult:
        async with optserve.AsyncClient(live_server, max_retries=0) as ac:
            return await ac.get_params(sid, ["2.weight"], params_dtype=wire)
    some = asyncio.run(pull())
    assert list(some.params) == ["2.weight"]
    assert torch.equal(some.params["2.weight"].view(torch.int16),
                       params["2.weight"].to(dtype).view(torch.int16))
    with pytest.raises(ValueError, match="params_dtype"):
        client.get_params(sid, params_dtype="float32")
    # rows: a few in the query (GET), many in a body (POST)
    for rows in ([3, 0, 3], list(range(96)) * 3):
        got_rows = client.pull_rows(sid, {"0.weight": rows}, params_dtype=wire)
        values = got_rows.params["0.weight"]._values()  # (in the order asked)
        assert values.dtype == dtype
        assert torch.equal(values.view(torch.int16),
                           params["0.weight"][rows].to(dtype).view(torch.int16))
    client.delete_session(sid)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_a_wire_dtype_worker_pulls_narrowed_bytes_and_holds_the_same_values(
        live_server: str, client: optserve.Client, wire: str) -> None:
    dtype = getattr(torch, wire)
    sid = f"sdk-narrowworker-{uuid.uuid4().hex[:8]}"
    start = {n: p.detach().clone() for n, p in model().named_parameters()}
    start["2.bias"][0] = 7e4  # past float16's range: that parameter stays at float32 there
    client.create_session("Adam", params=start, id=sid, options={"lr": 1e-2})
    counted = Counted()
    with httpx.Client(event_hooks={"response": [counted]}, timeout=60) as http, \
            optserve.Client(live_server, max_retries=0, http_client=http,
                            transport="http") as worker_client:
        full = len(client.get_params(sid).params)  # (a plain pull, for the byte count below)
        plain = Counted()
        with httpx.Client(event_hooks={"response": [plain]}, timeout=60) as ph, \
                optserve.Client(live_server, max_retries=0, http_client=ph,
                                transport="http") as plain_client:
            plain_client.get_params(sid)
        (_, full_bytes), = plain.pulls
        assert full == len(start)

        local = model()
        opt = optserve.RemoteOptimizer(local.named_parameters(), client=worker_client,
                                       session_id=sid, worker="w0", wire_dtype=wire)
        mine = {n: p.detach().clone() for n, p in local.named_parameters()}
        assert_bitwise(mine, as_narrowed_before(client.get_params(sid).params, dtype))
        joined = list(counted.pulls)
        counted.pulls.clear()

        # others move the session on; the worker pulls again
        moved = {n: t * 1.5 + 0.25 for n, t in start.items()}
        client.put_params(sid, moved)
        opt.pull_params()
        mine = {n: p.detach().clone() for n, p in local.named_parameters()}
        assert_bitwise(mine, as_narrowed_before(client.get_params(sid).params, dtype))
        pulled = list(counted.pulls)
        opt.close()
    for pulls in (joined, pulled):
        narrow_pulls = [(q, n) for q, n in pulls if q.get("params_dtype") == [wire]]
        assert len(narrow_pulls) == 1, pulls
        (query, narrow_bytes), = narrow_pulls
        assert "names" not in query
        # float32 values as 2 bytes each: about half a full-width pull's bytes
        assert narrow_bytes < 0.55 * full_bytes, (narrow_bytes, full_bytes)
        wide = [(q, n) for q, n in pulls if "params_dtype" not in q]
        # float16: the parameter that came back infinite, pulled again at its own width
        assert [q.get("names") for q, _ in wide] == ([["2.bias"]] if wire == "float16" else [])
    client.delete_session(sid)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_module_level_pull_params_narrowed(live_server: str, client: optserve.Client,
                                           wire: str) -> None:
    """``optserve.pull_params(client, sid, into=model, params_dtype=...)``: the pull travels
    narrowed (about half a float32 pull's bytes) and each local float32 parameter holds the
    session's value narrowed and widened, as torch's ``m.to(wire).to(torch.float32)``."""
    dtype = getattr(torch, wire)
    sid = f"sdk-narrowpull-module-{uuid.uuid4().hex[:8]}"
    client.create_session("Adam", params=dict(model().named_parameters()), id=sid,
                          options={"lr": 1e-2})
    master = {n: t.detach().clone() for n, t in client.get_params(sid).params.items()}
    counted = Counted()
    with httpx.Client(event_hooks={"response": [counted]}, timeout=60) as http, \
            optserve.Client(live_server, max_retries=0, http_client=http,
                            transport="http") as puller:
        into = model()
        with torch.no_grad():
            for p in into.parameters():
                p.zero_()
        full = optserve.pull_params(puller, sid, into=model())
        got = optserve.pull_params(puller, sid, into=into, params_dtype=wire)
    assert got.version == full.version
    assert_bitwise({n: p.detach() for n, p in into.named_parameters()},
                   {n: m.to(dtype).to(torch.float32) for n, m in master.items()})
    (full_query, full_bytes), (query, narrow_bytes) = counted.pulls
    assert "params_dtype" not in full_query and query["params_dtype"] == [wire]
    assert narrow_bytes < 0.55 * full_bytes, (narrow_bytes, full_bytes)
