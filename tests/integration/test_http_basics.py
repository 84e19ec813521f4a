"""The HTTP surface with plain httpx against a real server, every value checked against an
in-process ``torch.optim`` run on the same inputs (bitwise: same torch build, CPU)."""

from __future__ import annotations

import base64
import inspect
import json
import math
import struct
import uuid
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

pytestmark = pytest.mark.integration

DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.bfloat16: "bfloat16"}
BY_NAME = {v: k for k, v in DTYPES.items()}
BINARY = "application/octet-stream"


# --------------------------------------------------------------------------- wire helpers

def jt(t: torch.Tensor) -> dict[str, Any]:
    """JSON tensor, ``data`` form (every value exact: float16/bfloat16/float32 fit a double)."""
    return {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
            "data": t.detach().double().reshape(-1).tolist()}


def jt_b64(t: torch.Tensor) -> dict[str, Any]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
            "b64": base64.b64encode(raw).decode()}


def from_jt(obj: dict[str, Any]) -> torch.Tensor:
    dtype = BY_NAME[obj["dtype"]]
    if "b64" in obj:
        raw = bytearray(base64.b64decode(obj["b64"]))
        return torch.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).clone() if raw else \
            torch.empty(obj["shape"], dtype=dtype)
    words = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    values = [words[x] if isinstance(x, str) else x for x in obj["data"]]
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(obj["shape"])


def st_body(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return bytes(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                        metadata=metadata))


def st_read(content: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (by the safetensors library itself) and ``__metadata__`` (header parsed here)."""
    n = struct.unpack("<Q", content[:8])[0]
    header = json.loads(content[8:8 + n])
    return safetensors.torch.load(content), header.get("__metadata__", {})


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    want = want.detach()
    assert got.dtype == want.dtype, what
    assert got.shape == want.shape, what
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (
        f"{what}: {got} != {want}")


def assert_params(body: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert set(body["params"]) == set(want)
    for n, t in want.items():
        assert_bitwise(from_jt(body["params"][n]), t, n)


def create(http: httpx.Client, optimizer: str, options: dict[str, Any],
           params: dict[str, torch.Tensor] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"optimizer": optimizer, "options": options,
                            "id": f"basic-{uuid.uuid4().hex[:12]}", **extra}
    if params is not None:
        body["params"] = {n: jt(t) for n, t in params.items()}
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/sessions/{body['id']}"
    desc: dict[str, Any] = r.json()
    return desc


def version_headers(r: httpx.Response) -> tuple[str, str, str]:
    return r.headers["etag"], r.headers["x-optserve-version"], r.headers["x-optserve-step"]


def seeded(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- the seed example

def test_seed_example_sgd_on_4x_squared(http: httpx.Client) -> None:
    """f(x) = 4x², x0 = 2, SGD lr=1, grad 8x: x1 = 2 - 16 = -14, x2 = -14 + 112 = 98."""
    sid = create(http, "SGD", {"lr": 1.0}, {"x": torch.tensor([2.0])})["id"]
    x = torch.tensor([2.0], requires_grad=True)
    local = torch.optim.SGD([x], lr=1.0)
    expected = [-14.0, 98.0]
    current = 2.0
    for i, want in enumerate(expected, start=1):
        r = http.post(f"/v1/sessions/{sid}/step",
                      json={"grads": {"x": {"dtype": "float32", "shape": [1],
                                            "data": [8 * current]}}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["params"]["x"] == {"dtype": "float32", "shape": [1], "data": [want]}
        assert (body["version"], body["step"], body["lr"], body["skipped"]) == (i, i, [1.0], False)
        local.zero_grad()
        (4 * x**2).sum().backward()
        local.step()
        assert x.item() == want
        current = body["params"]["x"]["data"][0]
    body = http.get(f"/v1/sessions/{sid}/params").json()
    assert (body["version"], body["step"]) == (2, 2)
    assert body["params"] == {"x": {"dtype": "float32", "shape": [1], "data": [98.0]}}
    assert body.get("lr", [1.0]) == [1.0]


# --------------------------------------------------------------------------- encodings

def _mixed_params() -> dict[str, torch.Tensor]:
    return {"w": seeded((2, 3), 1), "h": seeded((4,), 2, torch.bfloat16),
            "f": seeded((3,), 3, torch.float16), "d": seeded((2, 2), 4, torch.float64),
            "s": torch.tensor(0.75)}


def _torch_adam(params: dict[str, torch.Tensor], grads_per_step: list[dict[str, torch.Tensor]],
                **options: Any) -> dict[str, torch.Tensor]:
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), **options)
    for grads in grads_per_step:
        for n, p in local.items():
            p.grad = grads[n].clone() if n in grads else None
        opt.step()
    return local


def test_request_and_response_encodings_agree(http: httpx.Client) -> None:
    params = _mixed_params()
    grads = [{n: seeded(tuple(t.shape), 10 * k + i, t.dtype) for i, (n, t) in
              enumerate(params.items())} for k in range(2)]
    want_1 = _torch_adam(params, grads[:1], lr=0.01)
    want_2 = _torch_adam(params, grads, lr=0.01)
    bodies = {
        "data": lambda g: {"json": {"grads": {n: jt(t) for n, t in g.items()}}},
        "b64": lambda g: {"json": {"grads": {n: jt_b64(t) for n, t in g.items()}}},
        "safetensors": lambda g: {"content": st_body(g),
                                  "headers": {"content-type": BINARY}},
    }
    for request_kind, make in bodies.items():
        for response_kind in ("data", "b64", "binary"):
            sid = create(http, "Adam", {"lr": 0.01}, params)["id"]
            for step, (g, want) in enumerate(zip(grads, (want_1, want_2), strict=True), 1):
                kwargs = make(g)
                headers = dict(kwargs.pop("headers", {}))
                query = {}
                if response_kind == "binary":
                    headers["accept"] = BINARY
                elif response_kind == "b64":
                    query["encoding"] = "b64"
                r = http.post(f"/v1/sessions/{sid}/step", headers=headers, params=query,
                              **kwargs)
                assert r.status_code == 200, (request_kind, response_kind, r.text)
                assert version_headers(r) == (f'"{step}"', str(step), str(step))
                if response_kind == "binary":
                    assert r.headers["content-type"] == BINARY
                    tensors, meta = st_read(r.content)
                    assert set(tensors) == set(want)
                    for n, t in want.items():
                        assert_bitwise(tensors[n], t, f"{request_kind}/{n}")
                    assert json.loads(meta["version"]) == step
                    assert json.loads(meta["step"]) == step
                    assert json.loads(meta["lr"]) == [0.01]
                    assert json.loads(meta["skipped"]) is False
                else:
                    body = r.json()
                    assert_params(body, want)
                    key = "b64" if response_kind == "b64" else "data"
                    assert all(key in t for t in body["params"].values())
            # pulls in all three encodings agree too
            pulled = [
                {n: from_jt(t) for n, t in http.get(f"/v1/sessions/{sid}/params").json()[
                    "params"].items()},
                {n: from_jt(t) for n, t in http.get(f"/v1/sessions/{sid}/params", params={
                    "encoding": "b64"}).json()["params"].items()},
                st_read(http.get(f"/v1/sessions/{sid}/params",
                                 headers={"accept": BINARY}).content)[0],
            ]
            for got in pulled:
                for n, t in want_2.items():
                    assert_bitwise(got[n], t, n)


def test_nonfinite_values_travel_as_strings(http: httpx.Client) -> None:
    p = torch.tensor([1.0, 2.0, 3.0])
    sid = create(http, "SGD", {"lr": 0.5}, {"p": p}, nonfinite="allow")["id"]
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"p": {
        "dtype": "float32", "shape": [3], "data": ["NaN", "Infinity", 1.0]}}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["params"]["p"]["data"] == ["NaN", "-Infinity", 2.5]
    assert body["nonfinite"] == ["p"] and body["skipped"] is False
    local = p.clone()
    local.grad = torch.tensor([math.nan, math.inf, 1.0])
    torch.optim.SGD([local], lr=0.5).step()
    torch.testing.assert_close(from_jt(body["params"]["p"]), local, rtol=0, atol=0,
                               equal_nan=True)


def test_return_none(http: httpx.Client) -> None:
    params = {"w": seeded((3,), 5)}
    sid = create(http, "Adam", {"lr": 0.1}, params)["id"]
    g = seeded((3,), 6)
    r = http.post(f"/v1/sessions/{sid}/step", params={"return": "none"},
                  json={"grads": {"w": jt(g)}})
    assert r.status_code == 200
    body = r.json()
    metrics = body.pop("metrics")  # with return=none too (values: test_metrics_history.py)
    assert body == {"version": 1, "step": 1, "lr": [0.1], "skipped": False}
    assert metrics["groups"][0]["lr"] == 0.1 and metrics["nonfinite"] == 0
    assert version_headers(r) == ('"1"', "1", "1")
    r = http.post(f"/v1/sessions/{sid}/step", params={"return": "none"},
                  json={"grads": {"w": jt(g)}}, headers={"accept": BINARY})
    tensors, meta = st_read(r.content)
    assert tensors == {} and json.loads(meta["version"]) == 2
    want = _torch_adam(params, [{"w": g}, {"w": g}], lr=0.1)
    assert_params(http.get(f"/v1/sessions/{sid}/params").json(), want)


def test_version_headers_everywhere(http: httpx.Client) -> None:
    w = seeded((2,), 7)
    desc = create(http, "SGD", {"lr": 0.1}, {"w": w})
    sid = desc["id"]
    url = f"/v1/sessions/{sid}"
    r = http.get(url)
    assert version_headers(r) == ('"0"', "0", "0") and r.json() == desc
    r = http.post(f"{url}/grads", json={"grads": {"w": jt(w)}})
    assert version_headers(r) == ('"0"', "0", "0")
    assert r.json() == {"version": 0, "step": 0, "accumulated": ["w"]}
    r = http.post(f"{url}/zero_grad")
    assert version_headers(r) == ('"0"', "0", "0") and r.json()["accumulated"] == []
    r = http.post(f"{url}/step", json={"grads": {"w": jt(w)}}, headers={"accept": BINARY})
    assert version_headers(r) == ('"1"', "1", "1")
    r = http.put(f"{url}/params", content=st_body({"w": w}),
                 headers={"content-type": BINARY, "accept": BINARY})
    assert version_headers(r) == ('"2"', "2", "1")
    tensors, meta = st_read(r.content)
    assert_bitwise(tensors["w"], w)
    assert (json.loads(meta["version"]), json.loads(meta["step"])) == (2, 1)
    for headers in ({}, {"accept": BINARY}):
        assert version_headers(http.get(f"{url}/params", headers=headers)) == ('"2"', "2", "1")
    r = http.get(f"{url}/state_dict")
    assert version_headers(r) == ('"2"', "2", "1")
    r = http.put(f"{url}/state_dict", json=r.json())
    assert r.status_code == 200, r.text
    assert version_headers(r) == ('"3"', "3", "1")


# --------------------------------------------------------------------------- gradients

def test_gradient_accumulation_and_zero_grad(http: httpx.Client) -> None:
    params = {"w": seeded((2, 3), 11), "b": seeded((3,), 12)}
    sid = create(http, "SGD", {"lr": 0.05, "momentum": 0.9}, params)["id"]
    url = f"/v1/sessions/{sid}"
    g1 = {n: seeded(tuple(t.shape), 20 + i) for i, (n, t) in enumerate(params.items())}
    g2 = {"w": seeded((2, 3), 30)}
    g3 = {n: seeded(tuple(t.shape), 40 + i) for i, (n, t) in enumerate(params.items())}
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.SGD(list(local.values()), lr=0.05, momentum=0.9)

    # two pushes (JSON, then safetensors), then a step with no body grads
    assert http.post(f"{url}/grads", json={"grads": {n: jt(t) for n, t in g1.items()}}).json()[
        "accumulated"] == ["b", "w"]
    r = http.post(f"{url}/grads", content=st_body(g2), headers={"content-type": BINARY})
    assert r.json() == {"version": 0, "step": 0, "accumulated": ["b", "w"]}
    assert http.get(url).json()["accumulated"] == ["b", "w"]
    r = http.post(f"{url}/step", json={})
    assert r.status_code == 200, r.text
    local["w"].grad = g1["w"] + g2["w"]
    local["b"].grad = g1["b"].clone()
    opt.step()
    assert_params(r.json(), local)
    assert http.get(url).json()["accumulated"] == []  # the step consumed them

    # accumulated plus body grads in the same step add up
    http.post(f"{url}/grads", json={"grads": {"b": jt(g2["w"][0])}})
    r = http.post(f"{url}/step", json={"grads": {n: jt(t) for n, t in g3.items()}})
    local["w"].grad = g3["w"].clone()
    local["b"].grad = g2["w"][0] + g3["b"]
    opt.step()
    assert_params(r.json(), local)

    # zero_grad drops what was pushed
    http.post(f"{url}/grads", json={"grads": {"w": jt(g1["w"])}})
    r = http.post(f"{url}/zero_grad")
    assert r.json() == {"version": 2, "step": 2, "accumulated": []}
    r = http.post(f"{url}/step", json={"grads": {"b": jt(g1["b"])}})
    local["w"].grad = None
    local["b"].grad = g1["b"].clone()
    opt.step()
    assert_params(r.json(), local)
    assert (r.json()["version"], r.json()["step"]) == (3, 3)


def test_missing_parameter_is_skipped_like_grad_none(http: httpx.Client) -> None:
    """Adam with a parameter left out of a push: torch skips it (no state step, no decay)."""
    params = {"w": seeded((3, 2), 50), "b": seeded((2,), 51), "c": seeded((4,), 52)}
    options = {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}
    sid = create(http, "Adam", options, params)["id"]
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), **options)
    plan = [("w", "b", "c"), ("w",), ("w", "c"), ("b",)]
    for k, names in enumerate(plan):
        grads = {n: seeded(tuple(params[n].shape), 100 * k + i) for i, n in enumerate(names)}
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(g) for n, g in
                                                                  grads.items()}})
        assert r.status_code == 200, r.text
        for n, p in local.items():
            p.grad = grads.get(n)
        opt.step()
        assert_params(r.json(), local)
    state = http.get(f"/v1/sessions/{sid}/state_dict", params={"encoding": "b64"}).json()
    want_sd = opt.state_dict()
    assert set(state["state"]) == {"0", "1", "2"}
    for pid, entry in want_sd["state"].items():
        got = state["state"][str(pid)]
        assert set(got) == set(entry)
        for key, value in entry.items():
            assert_bitwise(from_jt(got[key]), value, f"{pid}.{key}")
    assert from_jt(state["state"]["1"]["step"]).item() == 2.0  # b stepped twice, not four times
    assert state["param_groups"][0]["param_names"] == ["w", "b", "c"]


# --------------------------------------------------------------------------- params

def test_get_and_put_params_by_name(http: httpx.Client) -> None:
    params = {"w": seeded((2, 2), 60), "b": seeded((2,), 61), "c": seeded((1,), 62)}
    sid = create(http, "Adam", {"lr": 0.02}, params)["id"]
    url = f"/v1/sessions/{sid}/params"
    assert set(http.get(url).json()["params"]) == {"w", "b", "c"}
    body = http.get(url, params={"names": "b"}).json()
    assert_params(body, {"b": params["b"]})
    assert_params(http.get(url, params={"names": "c,w"}).json(), {"c": params["c"], "w":
                                                                   params["w"]})
    assert_params(http.get(url, params=[("names", "w"), ("names", "b")]).json(),
                  {"w": params["w"], "b": params["b"]})
    tensors, _ = st_read(http.get(url, params={"names": "c"}, headers={"accept": BINARY}).content)
    assert list(tensors) == ["c"]

    new_b = torch.tensor([5.0, -5.0])
    r = http.put(url, json={"params": {"b": jt(new_b)}})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.json()["step"] == 0
    assert_params(r.json(), {"b": new_b})
    local = {n: t.clone() for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.02)
    with torch.no_grad():
        local["b"].copy_(new_b)
    grads = {n: seeded(tuple(t.shape), 70 + i) for i, (n, t) in enumerate(params.items())}
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {n: jt(g) for n, g in
                                                              grads.items()}})
    for n, p in local.items():
        p.grad = grads[n]
    opt.step()
    assert_params(r.json(), local)
    assert r.json()["version"] == 2


# --------------------------------------------------------------------------- param groups

def test_add_param_group_and_patch_sgd(http: httpx.Client) -> None:
    w, c = seeded((3,), 80), seeded((2,), 81)
    sid = create(http, "SGD", {"lr": 0.1, "momentum": 0.9}, {"w": w})["id"]
    url = f"/v1/sessions/{sid}"
    lw, lc = w.clone(), c.clone()
    opt = torch.optim.SGD([lw], lr=0.1, momentum=0.9)

    def step(k: int, names: tuple[str, ...]) -> dict[str, Any]:
        grads = {n: seeded((3,) if n == "w" else (2,), 90 + 10 * k + i)
                 for i, n in enumerate(names)}
        r = http.post(f"{url}/step", json={"grads": {n: jt(g) for n, g in grads.items()}})
        assert r.status_code == 200, r.text
        lw.grad = grads.get("w")
        lc.grad = grads.get("c")
        opt.step()
        body: dict[str, Any] = r.json()
        assert_params(body, {"w": lw, "c": lc} if "c" in body["params"] else {"w": lw})
        return body

    step(0, ("w",))
    r = http.post(f"{url}/param_groups", json={"params": {"c": jt(c)}, "lr": 0.01})
    assert r.status_code == 201, r.text
    opt.add_param_group({"params": [lc], "lr": 0.01})
    groups = r.json()["param_groups"]
    assert [g["params"] for g in groups] == [["w"], ["c"]]
    assert [(g["lr"], g["momentum"]) for g in groups] == [(0.1, 0.9), (0.01, 0.9)]
    assert version_headers(r)[1] == "1"
    body = step(1, ("w", "c"))
    assert body["lr"] == [0.1, 0.01]

    r = http.patch(f"{url}/param_groups/0", json={"lr": 0.05, "momentum": 0.5})
    assert r.status_code == 200, r.text
    assert (r.json()["param_groups"][0]["lr"], r.json()["param_groups"][0]["momentum"]) == (
        0.05, 0.5)
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[0]["momentum"] = 0.5
    r = http.patch(f"{url}/param_groups/1", json={"dampening": 0.25, "nesterov": False})
    assert r.status_code == 200, r.text
    opt.param_groups[1]["dampening"] = 0.25
    body = step(2, ("w", "c"))
    assert body["lr"] == [0.05, 0.01]
    step(3, ("c",))


def test_patch_betas_adam(http: httpx.Client) -> None:
    p = seeded((4,), 120)
    sid = create(http, "Adam", {"lr": 0.01}, {"p": p})["id"]
    local = p.clone()
    opt = torch.optim.Adam([local], lr=0.01)
    for k in range(3):
        if k == 1:
            r = http.patch(f"/v1/sessions/{sid}/param_groups/0",
                           json={"betas": [0.8, 0.99], "lr": 0.02})
            assert r.status_code == 200, r.text
            assert r.json()["param_groups"][0]["betas"] == [0.8, 0.99]
            opt.param_groups[0]["betas"] = (0.8, 0.99)
            opt.param_groups[0]["lr"] = 0.02
        g = seeded((4,), 130 + k)
        r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"p": jt(g)}})
        local.grad = g
        opt.step()
        assert_params(r.json(), {"p": local})


# --------------------------------------------------------------------------- create (binary)

def test_create_from_safetensors_with_metadata(http: httpx.Client) -> None:
    a, b = seeded((2, 3), 140), seeded((5,), 141, torch.float64)
    sid = f"st-{uuid.uuid4().hex[:10]}"
    metadata = {"optimizer": "AdamW", "options": json.dumps({"lr": 0.05, "weight_decay": 0.02}),
                "param_groups": json.dumps([{"params": ["a"]}, {"params": ["b"], "lr": 0.01}]),
                "id": sid, "nonfinite": "skip"}
    r = http.post("/v1/sessions", content=st_body({"a": a, "b": b}, metadata),
                  headers={"content-type": BINARY})
    assert r.status_code == 201, r.text
    desc = r.json()
    assert (desc["id"], desc["optimizer"], desc["nonfinite"]) == (sid, "AdamW", "skip")
    assert [g["params"] for g in desc["param_groups"]] == [["a"], ["b"]]
    assert desc["lr"] == [0.05, 0.01]
    assert desc["params"] == {"a": {"dtype": "float32", "shape": [2, 3]},
                              "b": {"dtype": "float64", "shape": [5]}}
    assert desc["defaults"]["weight_decay"] == 0.02
    la, lb = a.clone(), b.clone()
    opt = torch.optim.AdamW([{"params": [la]}, {"params": [lb], "lr": 0.01}], lr=0.05,
                            weight_decay=0.02)
    for k in range(2):
        ga, gb = seeded((2, 3), 150 + k), seeded((5,), 160 + k, torch.float64)
        r = http.post(f"/v1/sessions/{sid}/step", content=st_body({"a": ga, "b": gb}),
                      headers={"content-type": BINARY, "accept": BINARY})
        la.grad, lb.grad = ga, gb
        opt.step()
        tensors, _ = st_read(r.content)
        assert_bitwise(tensors["a"], la)
        assert_bitwise(tensors["b"], lb)
    # one group with every tensor when param_groups is absent; a bare word is a string
    r = http.post("/v1/sessions", content=st_body({"x": a}, {"optimizer": "SGD"}),
                  headers={"content-type": BINARY})
    assert r.status_code == 201, r.text
    assert r.json()["param_groups"][0]["params"] == ["x"]
    assert r.json()["defaults"]["lr"] == inspect.signature(torch.optim.SGD).parameters[
        "lr"].default


# --------------------------------------------------------------------------- catalogues

def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def test_optimizer_catalogue(http: httpx.Client) -> None:
    r = http.get("/v1/optimizers")
    assert r.status_code == 200
    body = r.json()
    names = [o["name"] for o in body["optimizers"]]
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LBFGS", "SparseAdam"} <= set(names)
    for entry in body["optimizers"]:
        cls = getattr(torch.optim, entry["name"])
        sig = inspect.signature(cls.__init__).parameters
        want = {k: p.default for k, p in sig.items()
                if k not in ("self", "params") and p.default is not inspect.Parameter.empty}
        assert entry["defaults"] == _jsonable(want), entry["name"]
    assert body["unsupported"] == []  # all of torch.optim (LBFGS by evaluations)


def test_scheduler_catalogue(http: httpx.Client) -> None:
    body = http.get("/v1/schedulers").json()
    by_name = {s["name"]: s for s in body["schedulers"]}
    assert {"StepLR", "CosineAnnealingLR", "OneCycleLR", "ReduceLROnPlateau",
            "SequentialLR"} <= set(by_name)
    step = by_name["StepLR"]
    assert step["required"] == ["step_size"]
    assert step["defaults"] == {"gamma": 0.1, "last_epoch": -1}
    assert step["default_step_on"] == "optimizer"
    assert by_name["ReduceLROnPlateau"]["default_step_on"] == "manual"
    for name, entry in by_name.items():
        sig = inspect.signature(getattr(torch.optim.lr_scheduler, name).__init__).parameters
        required = [k for k, p in sig.items() if k not in ("self", "optimizer")
                    and p.default is inspect.Parameter.empty]
        assert entry["required"] == required, name
    assert {u["name"] for u in body["unsupported"]} == {"LambdaLR", "MultiplicativeLR"}


# --------------------------------------------------------------------------- sessions, health

def test_list_describe_delete(http: httpx.Client) -> None:
    d1 = create(http, "SGD", {"lr": 0.1}, {"p": torch.zeros(2)})
    d2 = create(http, "Adam", {"lr": 0.01}, {"q": torch.ones(1, 2)},
                scheduler={"name": "StepLR", "options": {"step_size": 3}})
    assert d2["scheduler"] == {"name": "StepLR", "options": {"step_size": 3},
                               "step_on": "optimizer", "last_epoch": 0}
    assert d2["params"] == {"q": {"dtype": "float32", "shape": [1, 2]}}
    assert (d2["version"], d2["step"], d2["device"], d2["lr"]) == (0, 0, "cpu", [0.01])
    assert d2["defaults"]["betas"] == [0.9, 0.999]
    listed = {s["id"]: s for s in http.get("/v1/sessions").json()["sessions"]}
    assert listed[d1["id"]] == d1 and listed[d2["id"]] == d2
    assert http.get(f"/v1/sessions/{d2['id']}").json() == d2
    r = http.delete(f"/v1/sessions/{d1['id']}")
    assert r.status_code == 204 and r.content == b""
    assert http.get(f"/v1/sessions/{d1['id']}").status_code == 404
    assert http.delete(f"/v1/sessions/{d1['id']}").status_code == 404
    listed = {s["id"] for s in http.get("/v1/sessions").json()["sessions"]}
    assert d1["id"] not in listed and d2["id"] in listed
    # an id freed by delete can be taken again
    again = create(http, "SGD", {"lr": 0.3}, {"p": torch.zeros(1)}, id=d1["id"])
    assert again["id"] == d1["id"] and again["lr"] == [0.3]


def test_health(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = http.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready", "device": "cpu"})
