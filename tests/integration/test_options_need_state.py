"""Options whose state torch makes only at a parameter's first step (Adam's and AdamW's
``amsgrad``, RMSprop's ``momentum`` and ``centered``): turned on after the group stepped,
torch's next step raises ``KeyError`` mid-step. The service refuses such a change up front, as a
422 naming the option, whether it rides with a step or comes as a PATCH, and the session is
left exactly as it was (its next plain step equals torch's); turned on before the first step,
it is taken and the steps equal torch's with the option from the start."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

P0 = [1.0, -2.0, 3.0, 0.5]
G = [[0.1, -0.2, 0.3, 0.05], [-0.4, 0.1, 0.2, 0.3], [0.2, 0.2, -0.1, 0.0]]


def tensor(data: list[float]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [len(data)], "data": data}


def local(cls: type[torch.optim.Optimizer], options: dict[str, Any],
          grads: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(P0, requires_grad=True)
    opt = cls([p], **options)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach()


def params_of(answer: httpx.Response) -> torch.Tensor:
    assert answer.status_code == 200, answer.text
    return torch.tensor(answer.json()["params"]["w"]["data"], dtype=torch.float32)


@pytest.mark.parametrize(("name", "options", "change"), [
    ("Adam", {"lr": 0.01}, {"amsgrad": True}),
    ("AdamW", {"lr": 0.01}, {"amsgrad": True}),
    ("RMSprop", {"lr": 0.01}, {"momentum": 0.9}),
    ("RMSprop", {"lr": 0.01}, {"centered": True}),
])
def test_an_option_that_needs_first_step_state_is_refused_after_a_step(
        live_server: str, name: str, options: dict[str, Any], change: dict[str, Any]) -> None:
    cls = getattr(torch.optim, name)
    option = next(iter(change))
    with httpx.Client(base_url=live_server, timeout=30) as http:
        r = http.post("/v1/sessions", json={"optimizer": name, "options": options,
                                             "params": {"w": tensor(P0)}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        params_of(http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": tensor(G[0])}}))
        refused = [
            http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": tensor(G[1])},
                                                        "param_groups": {"0": change}}),
            http.patch(f"/v1/sessions/{sid}/param_groups/0", json=change),
        ]
        for r in refused:
            assert r.status_code == 422, r.text
            problem = r.json()
            assert problem["code"] == "option_needs_state"
            assert problem["field"].endswith(f"0.{option}") and option in problem["detail"]
        info = http.get(f"/v1/sessions/{sid}").json()
        assert info["version"] == 1
        # unchanged: the next plain steps are torch's without the option
        got = params_of(http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": tensor(G[1])}}))
        assert torch.equal(got, local(cls, options, G[:2]))
        # turned on before the first step, it is taken: torch's with it from the start
        r = http.post("/v1/sessions", json={"optimizer": name, "options": options,
                                             "params": {"w": tensor(P0)}})
        fresh = r.json()["id"]
        for k, g in enumerate(G):
            body: dict[str, Any] = {"grads": {"w": tensor(g)}}
            if k == 0:
                body["param_groups"] = {"0": change}
            got = params_of(http.post(f"/v1/sessions/{fresh}/step", json=body))
        assert torch.equal(got, local(cls, {**options, **change}, G))
