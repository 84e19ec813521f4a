"""``PUT .../state_dict?format=json`` with a binary Content-Type (``application/octet-stream``)
decodes the body as JSON whatever its Content-Type says, so it counts against
``OPTSERVE_MAX_BODIES_MB`` as a JSON body does (18 times its size, and its ``{``, ``[`` and
``"`` on top). It counted once per byte, as safetensors: a JSON text of empty lists within the
bound once, past it as JSON (a 413 sent as ``application/json``), was decoded all the same
(a 422 after hundreds of MB of Python lists). Now a 413 ``payload_too_large`` with nothing
done; a state that fits imports as before, and the session then steps as an in-process
``torch.optim.Adam`` that loaded the same state, bit for bit. Against a real uvicorn."""

from __future__ import annotations

import httpx
import orjson
import pytest
import torch

import optserve
from tests.conftest import LiveServer, _test_settings
from tests.torch_reference import (
    Reference,
    assert_tensors_equal,
    from_wire,
    json_tensor,
    tensors_from_json,
    to_wire,
)

pytestmark = pytest.mark.integration

BOUND = 16 << 20  # OPTSERVE_MAX_BODIES_MB
M = 12_000  # a state of two such float32 tensors as JSON: past 256 KiB, so counted
OPTIONS = {"lr": 1e-2}
OCTETS = {"Content-Type": "application/octet-stream"}


def grad(seed: int) -> torch.Tensor:
    return torch.randn(M, generator=torch.Generator().manual_seed(seed))


def test_a_json_state_sent_as_octets_counts_as_json() -> None:
    live = LiveServer(_test_settings(max_body_mb=1.5, max_bodies_mb=BOUND >> 20))
    with live.serving() as url, httpx.Client(base_url=url, timeout=60) as http:
        w0 = grad(0)
        with optserve.Client(url, transport="http") as client:
            sid = client.create_session("Adam", {"w": w0}, options=OPTIONS,
                                        durability="memory").id
        path = f"/v1/sessions/{sid}/state_dict"
        groups = http.get(path).json()["param_groups"]

        lists = 500_000
        hostile = (b'{"state": {}, "param_groups": ' + orjson.dumps(groups)
                   + b', "scheduler": [' + b",".join([b"[]"] * lists) + b"]}")
        assert len(hostile) < BOUND < 18 * len(hostile)
        for headers in (OCTETS, {"Content-Type": "application/json"}):
            r = http.put(path, params={"format": "json"}, content=hostile, headers=headers)
            assert r.status_code == 413, (headers, r.text)
            assert r.json()["code"] == "payload_too_large", r.text
        assert http.get(path).json()["state"] == {}
        assert http.get(f"/v1/sessions/{sid}").json()["revision"] == 0

        donor = Reference(torch.optim.Adam, [({"w": w0}, {})], OPTIONS)
        for seed in (1, 2):
            donor.step({"w": grad(seed)})
        state = {"state": to_wire(donor.optimizer.state_dict()["state"]),
                 "param_groups": groups}
        body = orjson.dumps(state)
        assert 256 * 1024 < len(body) and 18 * len(body) < BOUND
        r = http.put(path, params={"format": "json"}, content=body, headers=OCTETS)
        assert r.status_code == 200, r.text
        twin = Reference(torch.optim.Adam, [({"w": w0}, {})], OPTIONS)
        twin.optimizer.load_state_dict(donor.optimizer.state_dict())
        got = from_wire(http.get(path).json())["state"]["0"]
        for key, value in twin.optimizer.state_dict()["state"][0].items():
            assert torch.equal(got[key], value), key
        twin.step({"w": grad(3)})
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(grad(3))}})
        assert r.status_code == 200, r.text
        assert_tensors_equal(tensors_from_json(r.json()["params"]), twin.params, "after import")
