"""JSON request bodies are read one way only: a ``b64`` tensor whose base64 is not the one text
of its bytes (padding past its last group, nonzero bits after its last byte) is a 422
``invalid_tensor`` naming the tensor's ``b64``, and an object naming a key twice is a 400
``duplicate_key`` naming the key's path (each was taken: the extra text ignored, the last key
winning). Each refusal leaves the session exactly as it was, and its next step is torch's. What
the service's own files hold (records and snapshots written by servers that took such base64)
still loads and replays as it ran."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _test_settings
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.main import create_app
from app.wire import json_tensor

pytestmark = pytest.mark.integration

P0 = {"w": torch.tensor([0.5, -1.25, 2.0]), "v": torch.tensor([0.25, -3.0])}
G = {"w": torch.tensor([0.1, -0.2, 0.3]), "v": torch.tensor([1.0, -0.5])}
LR = 0.01


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_test_settings(data_dir=tmp_path))) as c:
        yield c


def b64_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                            ).decode()


def padded(t: torch.Tensor) -> str:
    """Padding past the last group of a text that needs none (``AAAA====`` reads as ``AAAA``):
    for tensors of a multiple of 3 bytes."""
    text = b64_of(t)
    assert not text.endswith("=")
    return text + "===="


def low_bits(t: torch.Tensor) -> str:
    """A nonzero bit after the last byte (``AB==`` reads as ``AA==``): for tensors whose bytes
    are not a multiple of 3 (the last character before the padding carries unused bits)."""
    text = b64_of(t)
    body = text.rstrip("=")
    assert body != text
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(body[-1]) + 1]
    return body[:-1] + last + text[len(body):]


def jt(t: torch.Tensor, b64: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if b64 is None:
        out["data"] = t.reshape(-1).tolist()
    else:
        out["b64"] = b64
    return out


def create(c: TestClient, **extra: Any) -> str:
    body = {"optimizer": "Adam", "options": {"lr": LR},
            "params": {n: jt(t) for n, t in P0.items()}, **extra}
    r = c.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def snapshot(c: TestClient, sid: str) -> tuple[Any, ...]:
    """Everything a refusal must leave as it was, in bytes: description (version, step, groups'
    options), parameters and optimizer state."""
    described = c.get(f"/v1/sessions/{sid}").json()
    params = c.get(f"/v1/sessions/{sid}/params?encoding=b64").json()
    state = c.get(f"/v1/sessions/{sid}/state_dict?encoding=b64").json()
    return described, params, state


def torch_adam(steps: int) -> dict[str, torch.Tensor]:
    live = {n: t.clone().requires_grad_(True) for n, t in P0.items()}
    opt = torch.optim.Adam(list(live.values()), lr=LR)
    for _ in range(steps):
        for n, p in live.items():
            p.grad = G[n].clone()
        opt.step()
    return {n: p.detach() for n, p in live.items()}


def steps_as_torch(c: TestClient, sid: str, stepped_before: int = 0) -> None:
    """The session's next step (the gradients G, JSON ``data``) equals torch's."""
    r = c.post(f"/v1/sessions/{sid}/step?encoding=b64",
               json={"grads": {n: jt(t) for n, t in G.items()}})
    assert r.status_code == 200, r.text
    want = torch_adam(stepped_before + 1)
    for n, t in r.json()["params"].items():
        got = torch.frombuffer(bytearray(base64.b64decode(t["b64"])), dtype=torch.float32)
        assert torch.equal(got, want[n]), n


def refused(r: Any, status: int, code: str, field: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert (problem["status"], problem["code"], problem["field"]) == (status, code, field)
    assert problem["type"] == f"urn:optserve:problem:{code}"


# ------------------------------------------------------------------ non-canonical base64

LR_T = torch.tensor(LR)  # a tensor lr: float32, 4 bytes (its last group carries unused bits)

#: (what is sent, given (client, session, b64 text of the tensor) -> the response; the tensor;
#: how the text is spoiled; the field named)
B64_CASES: dict[str, tuple[Callable[[TestClient, str, str], Any], torch.Tensor,
                           Callable[[torch.Tensor], str], str]] = {
    "step-grad-padded": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/step", json={
            "grads": {"w": jt(G["w"], text), "v": jt(G["v"])}}),
        G["w"], padded, "grads.w.b64"),
    "step-grad-bits": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/step", json={
            "grads": {"w": jt(G["w"]), "v": jt(G["v"], text)}}),
        G["v"], low_bits, "grads.v.b64"),
    "push-grad-padded": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/grads", json={
            "grads": {"w": jt(G["w"], text)}}),
        G["w"], padded, "grads.w.b64"),
    "put-params-padded": (
        lambda c, sid, text: c.put(f"/v1/sessions/{sid}/params", json={
            "params": {"w": jt(P0["w"], text)}}),
        P0["w"], padded, "params.w.b64"),
    "add-group-bits": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/param_groups", json={
            "params": {"u": jt(G["v"], text)}}),
        G["v"], low_bits, "param_group.params.u.b64"),
    "step-option-lr-bits": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/step", json={
            "grads": {n: jt(t) for n, t in G.items()},
            "param_groups": {"0": {"lr": jt(LR_T, text)}}}),
        LR_T, low_bits, "param_groups.0.lr.b64"),
    "patch-lr-bits": (
        lambda c, sid, text: c.patch(f"/v1/sessions/{sid}/param_groups/0",
                                     json={"lr": jt(LR_T, text)}),
        LR_T, low_bits, "param_groups.0.lr.b64"),
    "add-group-lr-bits": (
        lambda c, sid, text: c.post(f"/v1/sessions/{sid}/param_groups", json={
            "params": {"u": jt(G["v"])}, "lr": jt(LR_T, text)}),
        LR_T, low_bits, "param_group.lr.b64"),
    "import-state-padded": (
        lambda c, sid, text: c.put(f"/v1/sessions/{sid}/state_dict", json={
            "state": {"0": {"step": jt(torch.tensor(1.0)), "exp_avg": jt(G["w"], text),
                            "exp_avg_sq": jt(G["w"] * G["w"])}},
            "param_groups": [{**c.get(f"/v1/sessions/{sid}/state_dict").json()[
                "param_groups"][0]}]}),
        G["w"], padded, "state_dict.state.0.exp_avg.b64"),
}


@pytest.mark.parametrize("case", sorted(B64_CASES))
def test_non_canonical_base64_is_refused_naming_the_tensor(client: TestClient,
                                                           case: str) -> None:
    send, tensor, spoil, field = B64_CASES[case]
    sid = create(client)
    before = snapshot(client, sid)
    text = spoil(tensor)
    assert base64.b64decode(text) == base64.b64decode(b64_of(tensor))  # the same bytes
    refused(send(client, sid, text), 422, "invalid_tensor", field)
    assert snapshot(client, sid) == before
    steps_as_torch(client, sid)
    # the same request with the tensor's one base64 text is taken
    assert send(client, sid, b64_of(tensor)).status_code in (200, 201), case


@pytest.mark.parametrize("where", ["options", "param_groups", "params"])
def test_a_create_with_non_canonical_base64_makes_nothing(client: TestClient,
                                                          where: str) -> None:
    body: dict[str, Any] = {"optimizer": "Adam", "options": {"lr": LR},
                            "params": {n: jt(t) for n, t in P0.items()}}
    if where == "options":
        body["options"] = {"lr": jt(LR_T, low_bits(LR_T))}
        field = "options.lr.b64"
    elif where == "param_groups":
        body["param_groups"] = [{"params": body.pop("params"), "lr": jt(LR_T, low_bits(LR_T))}]
        field = "param_groups.0.lr.b64"
    else:
        body["params"]["w"] = jt(P0["w"], padded(P0["w"]))
        field = "params.w.b64"
    before = client.get("/v1/sessions").json()
    refused(client.post("/v1/sessions", json={**body, "id": "made"}), 422, "invalid_tensor",
            field)
    assert client.get("/v1/sessions").json() == before
    assert client.get("/v1/sessions/made").status_code == 404


def test_records_and_snapshots_holding_non_canonical_base64_still_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server before this check took a tensor lr's base64 with nonzero unused bits (at
    create, in a PATCH and with a step) and logged the options as sent; a server with the
    check restores such a session, from its log (as after ``kill -9``) and from its snapshot
    (after a graceful stop), as it ran: its parameters are torch's, and it steps on as
    torch does."""
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    loose = jt(LR_T, low_bits(LR_T))
    with monkeypatch.context() as old_server:
        old_server.setattr(json_tensor, "_canonical_b64", lambda text, raw: True)
        with TestClient(create_app(_test_settings(data_dir=data, durability="step",
                                                  snapshot_every_steps=1000))) as c:
            sid = create(c, options={"lr": loose}, id="old")
            steps_as_torch(c, sid)
            assert c.patch(f"/v1/sessions/{sid}/param_groups/0",
                           json={"lr": loose}).status_code == 200
            r = c.post(f"/v1/sessions/{sid}/step", json={
                "grads": {n: jt(t) for n, t in G.items()}, "param_groups": [{"lr": loose}]})
            assert r.status_code == 200, r.text
            shutil.copytree(data, crashed)  # what kill -9 would leave: the log, no snapshot
    assert json_tensor._canonical_b64(loose["b64"], bytearray(4)) is False
    for where in (crashed, data):
        with TestClient(create_app(_test_settings(data_dir=where, durability="step"))) as c:
            got = c.get("/v1/sessions/old/params").json()["params"]
            want = torch_adam(2)
            for n, t in got.items():
                assert torch.equal(torch.tensor(t["data"], dtype=torch.float32), want[n]), n
            steps_as_torch(c, "old", stepped_before=2)


# ------------------------------------------------------------------------ duplicate keys

def grads_text(**extra: str) -> str:
    parts = [f'"{n}": {json.dumps(jt(t))}' for n, t in G.items()]
    return "{" + ", ".join(parts) + "".join(f", {v}" for v in extra.values()) + "}"


#: (method, path under the session, JSON text with a key twice, the field named)
GRADS = grads_text()
W_AGAIN = grads_text(again=f'"w": {json.dumps(jt(G["w"] * 2))}')
V = json.dumps(jt(G["v"]))
DUPLICATE_CASES: dict[str, tuple[str, str, str, str]] = {
    "top-level": ("post", "step", f'{{"grads": {GRADS}, "grads": {{}}}}', "grads"),
    "a gradient": ("post", "step", f'{{"grads": {W_AGAIN}}}', "grads.w"),
    "a tensor's key": ("post", "step",
                       '{"grads": {"w": {"dtype": "float32", "shape": [3], "data": [1, 2, 3], '
                       f'"data": [0.1, -0.2, 0.3]}}, "v": {V}}}}}', "grads.w.data"),
    "an option with a step": ("post", "step", f'{{"grads": {GRADS}, "param_groups": {{"0": '
                              '{"lr": 0.5, "lr": 0.01}}}', "param_groups.0.lr"),
    "a group index": ("post", "step", f'{{"grads": {GRADS}, "param_groups": {{"0": '
                      '{"lr": 0.5}, "0": {}}}', "param_groups.0"),
    "PATCH": ("patch", "param_groups/0", '{"lr": 0.5, "lr": 0.01}', "lr"),
    "push": ("post", "grads", f'{{"grads": {GRADS}, "grads": {{}}}}', "grads"),
    "zero_grad": ("post", "zero_grad", '{"a": 1, "a": 1}', "a"),
    "state import": ("put", "state_dict", '{"state": {}, "state": {}, "param_groups": []}',
                     "state_dict.state"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATE_CASES))
def test_a_key_twice_in_one_object_is_refused_naming_it(client: TestClient, case: str) -> None:
    method, path, text, field = DUPLICATE_CASES[case]
    sid = create(client)
    json.loads(text)  # valid JSON (a key twice is not a syntax error)
    before = snapshot(client, sid)
    r = client.request(method.upper(), f"/v1/sessions/{sid}/{path}", content=text,
                       headers={"content-type": "application/json"})
    refused(r, 400, "duplicate_key", field)
    assert "twice" in r.json()["detail"]
    assert snapshot(client, sid) == before
    steps_as_torch(client, sid)


def test_a_long_key_twice_is_named_cut_to_200_characters(client: TestClient) -> None:
    """A repeated key 10,000 characters long is named, as other problems' fields are, in at
    most 200 characters (not echoed whole into the problem)."""
    sid = create(client)
    before = snapshot(client, sid)
    key = "k" * 10_000
    text = f'{{"grads": {GRADS}, "scalars": {{"{key}": 1.0, "{key}": 2.0}}}}'
    r = client.post(f"/v1/sessions/{sid}/step", content=text,
                    headers={"content-type": "application/json"})
    refused(r, 400, "duplicate_key", f"scalars.{key}"[:200])
    assert len(r.text) < 2_000
    assert snapshot(client, sid) == before


def test_a_create_naming_a_key_twice_makes_nothing(client: TestClient) -> None:
    params = json.dumps({n: jt(t) for n, t in P0.items()})
    text = ('{"id": "twice", "optimizer": "SGD", "optimizer": "Adam", '
            f'"options": {{"lr": {LR}}}, "params": {params}}}')
    r = client.post("/v1/sessions", content=text, headers={"content-type": "application/json"})
    refused(r, 400, "duplicate_key", "optimizer")
    assert client.get("/v1/sessions").json() == {"sessions": []}


@pytest.mark.parametrize(("entry", "text", "field"), [
    ("param_groups", '{"0": {"lr": 0.5, "lr": 0.01}}', "__metadata__.param_groups.0.lr"),
    ("scalars", '{"loss": 1.0, "loss": 2.0}', "__metadata__.scalars.loss"),
])
def test_a_key_twice_in_a_safetensors_bodys_metadata_is_refused(
        client: TestClient, entry: str, text: str, field: str) -> None:
    """The JSON texts of a safetensors body's ``__metadata__`` (a step's ``param_groups``,
    ``scalars``; a create's fields) are read as JSON bodies are."""
    sid = create(client)
    before = snapshot(client, sid)
    body = save(dict(G), metadata={entry: text})
    r = client.post(f"/v1/sessions/{sid}/step", content=body,
                    headers={"content-type": "application/octet-stream"})
    refused(r, 400, "duplicate_key", field)
    assert snapshot(client, sid) == before
    steps_as_torch(client, sid)
    made = save(dict(P0), metadata={"optimizer": "Adam", "options": '{"lr": 0.1, "lr": 1}'})
    r = client.post("/v1/sessions", content=made,
                    headers={"content-type": "application/octet-stream"})
    refused(r, 400, "duplicate_key", "__metadata__.options.lr")
    assert [s["id"] for s in client.get("/v1/sessions").json()["sessions"]] == [sid]


def _safetensors_with_header(header: bytes, data: bytes) -> bytes:
    """A safetensors body with this header text as written (``save`` writes no key twice)."""
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


def _entry(name: str, t: torch.Tensor, start: int, dtype: str = "F32") -> str:
    end = start + t.numel() * t.element_size()
    return (f'"{name}": {{"dtype": "{dtype}", "shape": {list(t.shape)}, '
            f'"data_offsets": [{start}, {end}]}}')


_GRADS_DATA = G["w"].numpy().tobytes() + G["v"].numpy().tobytes()
_W_END = G["w"].numel() * 4
_GRAD_ENTRIES = f'{_entry("w", G["w"], 0)}, {_entry("v", G["v"], _W_END)}'
_TWICE = ('"__metadata__": {"param_groups": "{\\"0\\": {\\"lr\\": 0.5}}", '
          '"param_groups": "{\\"0\\": {\\"lr\\": 0.001}}"}')


@pytest.mark.parametrize(("header", "field"), [
    # the __metadata__ object names an entry twice, first in the header (as writers put it)...
    ("{" + _TWICE + ", " + _GRAD_ENTRIES + "}", "__metadata__.param_groups"),
    # ... or after the tensors
    ("{" + _GRAD_ENTRIES + ", " + _TWICE + "}", "__metadata__.param_groups"),
    # __metadata__ itself twice: one with an lr change, one without
    ('{"__metadata__": {"param_groups": "{\\"0\\": {\\"lr\\": 0.5}}"}, ' + _GRAD_ENTRIES
     + ', "__metadata__": {}}', "__metadata__"),
    # a tensor named twice, with other dtypes over the same bytes
    ("{" + _GRAD_ENTRIES + ", " + _entry("w", G["w"], 0, "I32") + "}", "w"),
])
def test_a_key_twice_in_a_safetensors_header_is_refused(
        client: TestClient, header: str, field: str) -> None:
    """The safetensors header is a JSON text too: its ``__metadata__`` naming an entry twice
    (which ``param_groups`` would the step take?), or the header naming ``__metadata__`` or a
    tensor twice, is a 400 ``duplicate_key`` naming it, and nothing is done (it was taken:
    the last one winning, a step with lr 0.001 where a reader sees 0.5 first)."""
    sid = create(client)
    before = snapshot(client, sid)
    r = client.post(f"/v1/sessions/{sid}/step",
                    content=_safetensors_with_header(header.encode(), _GRADS_DATA),
                    headers={"content-type": "application/octet-stream"})
    refused(r, 400, "duplicate_key", field)
    assert snapshot(client, sid) == before
    steps_as_torch(client, sid)
