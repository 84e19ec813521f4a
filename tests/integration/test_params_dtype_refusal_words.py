"""A parameter value of another dtype than the session holds (``PUT .../params``) is refused
with words that fit it: a model converted with ``.to(torch.bfloat16)`` after its
``RemoteOptimizer`` was made sends its bfloat16 values as an edit before the next step, and the
422 told it to "send ?upcast=true to widen float16/bfloat16 gradients", which ``PUT
.../params`` does not take (a local torch optimizer steps such a model on; a session keeps its
parameters' dtype). Gradients of a step, which may ask for the widening, keep that hint."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from torch import nn

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def test_a_model_converted_after_its_optimizer_was_made_is_told_why(
        client: optserve.Client) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = optserve.RemoteOptimizer(model.named_parameters(), "AdamW", client, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    model(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    with pytest.raises(optserve.ValidationError) as refused:
        opt.step()
    assert refused.value.code == "dtype_mismatch"
    words = str(refused.value)
    assert "is float32 but the tensor sent is bfloat16" in words
    assert "upcast" not in words
    assert "keeps the dtype its session holds it in" in words
    assert "needs a new session" in words
    session = client.get_session(opt.session_id)
    assert (session.version, session.step) == (0, 0)  # nothing applied
    pulled = client.get_params(opt.session_id)
    for name, value in before.items():
        assert torch.equal(torch.as_tensor(pulled.params[name]), value), name


def test_gradients_that_may_be_widened_keep_the_upcast_hint(live_server: str,
                                                           client: optserve.Client) -> None:
    info = client.create_session("SGD", {"w": torch.zeros(3)}, options={"lr": 0.1})
    narrow = {"w": {"dtype": "bfloat16", "shape": [3], "data": [1.0, 2.0, 3.0]}}
    with httpx.Client(base_url=live_server) as http:
        step = http.post(f"/v1/sessions/{info.id}/step", json={"grads": narrow})
        put = http.put(f"/v1/sessions/{info.id}/params", json={"params": narrow})
    assert step.status_code == put.status_code == 422
    assert step.json()["field"] == "grads.w" and put.json()["field"] == "params.w"
    assert "send ?upcast=true to widen float16/bfloat16 gradients" in step.json()["detail"]
    assert "upcast" not in put.json()["detail"]
    assert "no silent casts" in put.json()["detail"]
