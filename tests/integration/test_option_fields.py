"""A refused option names where the client gave it: the group it is in (when several groups
change at once, in a create's ``param_groups`` or a step's option changes), and the option the
client sent rather than one the group already held that torch's message also mentions."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.wire.json_tensor import decode_json_tensor

pytestmark = pytest.mark.integration


def vector(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def two_groups(app_client: TestClient) -> str:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1},
        "param_groups": [{"params": {"w": vector([1.0, 2.0])}},
                         {"params": {"b": vector([3.0])}}]})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def refused_field(r: Any) -> str:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return str(r.json()["field"])


@pytest.mark.parametrize("changes", [
    [{"lr": -1.0}, {"lr": 0.2}],
    {"0": {"lr": -1.0}, "1": {"lr": 0.2}},
    {"1": {"lr": 0.2}, "0": {"lr": -1.0}},
])
def test_a_step_names_the_group_whose_option_is_refused(app_client: TestClient,
                                                       changes: Any) -> None:
    sid = two_groups(app_client)
    r = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector([0.1, 0.1]), "b": vector([0.1])}, "param_groups": changes})
    assert refused_field(r) == "param_groups.0.lr"
    assert app_client.get(f"/v1/sessions/{sid}").json()["version"] == 0


def test_a_create_names_the_group_whose_option_is_refused(app_client: TestClient) -> None:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1},
        "param_groups": [{"params": {"w": vector([1.0])}, "lr": -1.0},
                         {"params": {"b": vector([3.0])}, "lr": 0.2}]})
    assert refused_field(r) == "param_groups.0.lr"


@pytest.mark.parametrize("how", ["patch", "step"])
def test_the_option_sent_is_named_not_one_the_group_held(app_client: TestClient,
                                                         how: str) -> None:
    """SGD's "Nesterov momentum requires a momentum and zero dampening", for a ``nesterov``
    sent to a group without momentum, is about ``nesterov``."""
    sid = two_groups(app_client)
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/1", json={"nesterov": True})
    else:
        r = app_client.post(f"/v1/sessions/{sid}/step", json={
            "grads": {"b": vector([0.1])}, "param_groups": {"1": {"nesterov": True}}})
    assert refused_field(r) == "param_groups.1.nesterov"


@pytest.mark.parametrize("entry", [0, False, "", []])
def test_a_step_refuses_a_group_change_that_is_not_an_object(app_client: TestClient,
                                                             entry: Any) -> None:
    """In the list form only ``null`` and ``{}`` leave a group alone: any other entry that is
    not an object is refused (as in the keyed form), not taken for "no change"."""
    sid = two_groups(app_client)
    r = app_client.post(f"/v1/sessions/{sid}/step", json={
        "grads": {"w": vector([0.1, 0.1])}, "param_groups": [entry, {"lr": 0.2}]})
    assert refused_field(r) == "param_groups.0"
    assert app_client.get(f"/v1/sessions/{sid}").json()["version"] == 0


def _muon(app_client: TestClient) -> str:
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Muon", "options": {"lr": 0.02},
        "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize(("option", "value"), [("ns_steps", 100),
                                               ("adjust_lr_fn", "bogus")])
@pytest.mark.parametrize("how", ["create", "patch", "step"])
def test_muons_refusals_name_the_option_not_one_its_words_contain(
        app_client: TestClient, how: str, option: str, value: Any) -> None:
    """Muon's "Number of steps must be less than 100" named ``eps`` (the hint "eps" was read
    in "steps") and "Adjust learning rate function ... is not supported" named ``lr``; they
    name ``ns_steps`` and ``adjust_lr_fn``, and the session is unchanged."""
    import torch

    grads = {"w": {"dtype": "float32", "shape": [2, 2], "data": [0.5, -0.25, 0.125, 1.0]}}
    if how == "create":
        r = app_client.post("/v1/sessions", json={
            "optimizer": "Muon", "options": {"lr": 0.02, option: value},
            "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}}})
        assert refused_field(r) == f"options.{option}"
        return
    sid = _muon(app_client)
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json={option: value})
    else:
        r = app_client.post(f"/v1/sessions/{sid}/step",
                            json={"grads": grads, "param_groups": {"0": {option: value}}})
    assert refused_field(r) == f"param_groups.0.{option}"
    assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
    # the session steps on as torch's Muon does
    r = app_client.post(f"/v1/sessions/{sid}/step", json={"grads": grads})
    assert r.status_code == 200, r.text
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    opt = torch.optim.Muon([w], lr=0.02)
    w.grad = torch.tensor([[0.5, -0.25], [0.125, 1.0]])
    opt.step()
    got = app_client.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32).reshape(2, 2), w.detach())


#: options torch's constructor takes and its step refuses only where a throwaway step over a
#: tiny parameter never goes: SGD converts ``1 - dampening`` to the parameters' dtype at a
#: parameter's second step (its first clones the gradient into the momentum buffer), Muon
#: scales ``lr`` by the parameter's shape (``sqrt(rows / cols)``); and where torch's words
#: name no option ("value cannot be converted to type c10::Half without overflow")
LATER_REFUSALS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": -65504.0}, "float16", [3],
     "options.dampening"),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 100000}, "float16", [3],
     "options.dampening"),
    ("SGD", {"lr": 0.1, "weight_decay": 100000}, "float16", [3], "options.weight_decay"),
    ("Muon", {"lr": 3e38}, "float32", [4, 3], "options.lr"),
    ("Muon", {"lr": 3e38}, "bfloat16", [4, 3], "options.lr"),
]


@pytest.mark.parametrize(("optimizer", "options", "dtype", "shape", "field"), LATER_REFUSALS,
                         ids=[f"{o}-{d}-{'-'.join(opts)}" for o, opts, d, _, _ in LATER_REFUSALS])
def test_options_torch_refuses_at_a_later_step_are_refused_at_create(
        app_client: TestClient, optimizer: str, options: dict[str, Any], dtype: str,
        shape: list[int], field: str) -> None:
    """They were taken, and a later step failed half-way: a 500 ``apply_failed`` at every
    step, and with durability ``memory`` the session was out of service for good (503
    ``session_damaged``). torch is checked here to refuse them at its own step."""
    import torch

    p = torch.nn.Parameter(torch.ones(shape, dtype=getattr(torch, dtype)))
    opt = getattr(torch.optim, optimizer)([p], **options)
    with pytest.raises(RuntimeError, match="without overflow"):
        for _ in range(3):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
    r = app_client.post("/v1/sessions", json={
        "optimizer": optimizer, "options": options, "durability": "memory",
        "params": {"w": {"dtype": dtype, "shape": shape, "data": [1.0] * p.numel()}}})
    assert refused_field(r) == field
    assert "overflow" in r.json()["detail"]


@pytest.mark.parametrize(("how", "change"), [
    ("patch", {"lr": 3e38}), ("step", {"lr": 3e38}),
    # (taken: 2.9e38 is 3.35e38 scaled for (4, 3), in float32's range; match_rms_adamw
    # scales by 0.2 * sqrt(max(rows, cols)), 0.4 here)
    ("patch", {"lr": 2.9e38}), ("step", {"lr": 2.9e38}),
    ("patch", {"lr": 3e38, "adjust_lr_fn": "match_rms_adamw"}),
])
def test_a_muon_lr_past_its_scaled_range_is_refused_by_a_patch_and_a_steps_options(
        app_client: TestClient, how: str, change: dict[str, Any]) -> None:
    """An ``lr`` PATCHed (or sent with a step) to where Muon's scaling for the session's
    (4, 3) parameter takes it past float32 was taken (torch's constructor takes it, and the
    throwaway step's tiny square parameter never scales it): then every step was a 422 until
    it was changed back. It is a 422 ``option_overflow`` naming the option sent, in the
    create's words, and the session is as it was; an lr the scaling keeps in range is taken
    and the session steps on as torch's Muon does. torch is checked here to refuse each
    refused change at its own step, and to take each taken one."""
    import torch

    w0 = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    grad = torch.linspace(-1, 1, 12).reshape(4, 3)
    ref = torch.nn.Parameter(torch.ones(4, 3))
    probe = torch.optim.Muon([ref], **{"lr": 0.02, **change})
    ref.grad = grad.clone()
    try:
        probe.step()
        overflows = False
    except RuntimeError as exc:
        assert "without overflow" in str(exc)
        overflows = True
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Muon", "options": {"lr": 0.02}, "durability": "memory",
        "params": {"w": {"dtype": "float32", "shape": [4, 3], "data": w0.flatten().tolist()}}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    body: dict[str, Any] = {"grads": {"w": {"dtype": "float32", "shape": [4, 3],
                                            "data": grad.flatten().tolist()}}}
    assert app_client.post(f"/v1/sessions/{sid}/step", json=body).status_code == 200
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    if how == "patch":
        r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json=change)
    else:
        r = app_client.post(f"/v1/sessions/{sid}/step",
                            json={**body, "param_groups": {"0": change}})
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Muon([w], lr=0.02)
    w.grad = grad.clone()
    opt.step()
    if not overflows:
        assert r.status_code == 200, r.text
        opt.param_groups[0].update(change)
        if how == "step":
            w.grad = grad.clone()
            opt.step()
    else:
        assert refused_field(r) == "param_groups.0.lr"
        assert r.json()["code"] == "option_overflow"
        assert "once Muon scales it for the shape [4, 3]" in r.json()["detail"]
        assert "Every step is refused" not in r.json()["detail"]
        assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
    r = app_client.post(f"/v1/sessions/{sid}/step", json=body)
    assert r.status_code == 200, r.text
    w.grad = grad.clone()
    opt.step()
    got = app_client.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]
    # (an lr of 2.9e38 makes torch's parameters infinite: compared as they are, NaN too)
    torch.testing.assert_close(decode_json_tensor(got, "w"), w.detach(), rtol=0, atol=0,
                               equal_nan=True)


def test_a_muon_adjust_lr_fn_that_scales_the_lr_past_the_range_is_the_option_named(
        app_client: TestClient) -> None:
    """``adjust_lr_fn: match_rms_adamw`` scales the lr by ``0.2 * sqrt(max(rows, cols))``, 2
    for a (3, 100) parameter, which the default scaling (``sqrt(max(1, rows / cols))``) leaves
    at 1: a PATCH of it alone onto an lr of 2e38 takes the lr past float32, and is the option
    named (checked against torch's own step)."""
    import torch

    p = torch.nn.Parameter(torch.ones(3, 100))
    opt = torch.optim.Muon([p], lr=2e38)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    opt.param_groups[0]["adjust_lr_fn"] = "match_rms_adamw"
    with pytest.raises(RuntimeError, match="without overflow"):
        opt.step()
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Muon", "options": {"lr": 2e38},
        "params": {"w": {"dtype": "float32", "shape": [3, 100], "data": [1.0] * 300}}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0",
                         json={"adjust_lr_fn": "match_rms_adamw"})
    assert refused_field(r) == "param_groups.0.adjust_lr_fn"
    assert r.json()["code"] == "option_overflow"
    group = app_client.get(f"/v1/sessions/{sid}").json()["param_groups"][0]
    assert group["adjust_lr_fn"] is None and group["lr"] == 2e38


def test_an_sgd_dampening_past_float16_is_refused_by_a_patch(app_client: TestClient) -> None:
    """The create's two throwaway steps (SGD with momentum converts ``1 - dampening`` to the
    parameters' dtype only from a parameter's second step) check a PATCH too: a float16
    session's ``dampening`` of -65504 is a 422 naming it, the session as it was, as torch
    refuses it at its second step."""
    import torch

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=-65504.0)
    with pytest.raises(RuntimeError, match="without overflow"):
        for _ in range(2):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
    r = app_client.post("/v1/sessions", json={
        "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9}, "durability": "memory",
        "params": {"w": {"dtype": "float16", "shape": [3], "data": [1.0] * 3}}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = app_client.patch(f"/v1/sessions/{sid}/param_groups/0", json={"dampening": -65504.0})
    assert refused_field(r) == "param_groups.0.dampening"
    assert app_client.get(f"/v1/sessions/{sid}").json()["param_groups"][0]["dampening"] == 0


@pytest.mark.parametrize("how", ["import", "add_group"])
def test_a_muon_lr_past_its_scaled_range_is_refused_by_an_import_and_a_new_group(
        app_client: TestClient, how: str) -> None:
    """A state import whose group ``lr`` Muon's scaling for the session's (4, 3) parameter
    takes past float32 was a 500 (the import's throwaway step over the parameters' own shapes
    raised); a group added with one, over a (40, 3) parameter, was taken and every step after
    it refused. Both are 422s naming that ``lr``, the session as it was; torch's Muon is checked
    here to refuse the scaled lr at its step."""
    import torch

    for shape in ([4, 3], [40, 3]):
        p = torch.nn.Parameter(torch.ones(shape))
        opt = torch.optim.Muon([p], lr=3e38)
        p.grad = torch.full_like(p, 0.5)
        with pytest.raises(RuntimeError, match="without overflow"):
            opt.step()
    r = app_client.post("/v1/sessions", json={
        "optimizer": "Muon", "options": {"lr": 0.02}, "durability": "memory",
        "params": {"w": {"dtype": "float32", "shape": [4, 3], "data": [1.0] * 12}}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    body = {"grads": {"w": {"dtype": "float32", "shape": [4, 3], "data": [0.5] * 12}}}
    assert app_client.post(f"/v1/sessions/{sid}/step", json=body).status_code == 200
    before = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
    if how == "import":
        state = app_client.get(f"/v1/sessions/{sid}/state_dict").json()
        state["param_groups"][0]["lr"] = 3e38
        r = app_client.put(f"/v1/sessions/{sid}/state_dict", json=state)
        assert refused_field(r) == "state_dict.param_groups.0.lr"
    else:
        r = app_client.post(f"/v1/sessions/{sid}/param_groups", json={
            "params": {"v": {"dtype": "float32", "shape": [40, 3], "data": [1.0] * 120}},
            "lr": 3e38})
        assert refused_field(r) == "param_groups.1.lr"
    assert app_client.get(f"/v1/sessions/{sid}/state_dict").json() == before
    assert app_client.post(f"/v1/sessions/{sid}/step", json=body).status_code == 200
