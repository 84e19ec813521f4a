"""Narrow wires over plain HTTP, at sizes where the server takes its fast path: bodies past
64 KiB, whose narrowed answer is written over the spent float16/bfloat16 gradients (when every
parameter's answer has its gradient's dtype and shape; packed apart when not).

Every answer is compared with an in-process ``torch.optim`` run on the gradients widened the
same way, bitwise, step after step (an answer written in the wrong dtype, or over a body it
does not fit, shows up as a difference); the float32 master weights are compared too, and
after a restart on the same data directory the log's replay must give the same session
(replay widens through the same code). Sessions sharded and not (``shards``): each shard
widens its part of the gradients, and the shards' answer is narrowed as the unsharded
session's is (packed apart from the body).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
#: float32 parameters of 12,000 + 20,000 values (bfloat16 gradients: 64 KB, past SMALL_PART),
#: a float16 parameter (never narrowed further) and a float64 one
SHAPES = {"w": ((40, 300), torch.float32), "b": ((20_000,), torch.float32),
          "h": ((3000,), torch.float16), "d": ((500,), torch.float64)}


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype) in SHAPES.items()}


def grads_of(k: int, narrow: torch.dtype) -> dict[str, torch.Tensor]:
    """Step ``k``'s gradients: ``narrow`` for the wider parameters, float16 for ``h``."""
    g = torch.Generator().manual_seed(1000 + k)
    return {n: torch.randn(shape, generator=g).mul(0.5).to(
        torch.float16 if dtype == torch.float16 else narrow)
        for n, (shape, dtype) in SHAPES.items()}


def jt(t: torch.Tensor) -> dict[str, object]:
    names = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}
    return {"dtype": names[t.dtype], "shape": list(t.shape),
            "data": t.double().reshape(-1).tolist()}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[str]:
    live = LiveServer(_test_settings(data_dir=data_dir, durability="step"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def local_run(narrow: torch.dtype, steps: int, lr: float = 1e-2
              ) -> tuple[list[dict[str, torch.Tensor]], torch.optim.Optimizer]:
    params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    after = []
    for k in range(steps):
        for n, g in grads_of(k, narrow).items():
            params[n].grad = g.to(params[n].dtype)
        opt.step()
        after.append({n: p.detach().clone() for n, p in params.items()})
    return after, opt


def create(http: httpx.Client, sid: str, shards: int = 1) -> None:
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "Adam", "shards": shards,
                                         "options": {"lr": 1e-2},
                                         "params": {n: jt(t) for n, t in initial().items()}})
    assert r.status_code == 201, r.text


def step(http: httpx.Client, sid: str, grads: dict[str, torch.Tensor], query: str
         ) -> dict[str, torch.Tensor]:
    r = http.post(f"/v1/sessions/{sid}/step?{query}", content=safetensors.torch.save(grads),
                  headers={"Content-Type": BINARY, "Accept": BINARY})
    assert r.status_code == 200, r.text
    return safetensors.torch.load(r.content)


def master(http: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    return safetensors.torch.load(r.content)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, (what, n)
        assert torch.equal(got[n], want[n]), f"{what}: {n} differs"


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize(("narrow", "answer"), [
    (torch.bfloat16, "bfloat16"),  # the answer over the spent gradients
    (torch.float16, "float16"),    # the same, float16
    (torch.float16, "bfloat16"),   # gradients float16, answer bfloat16: packed apart
    (torch.bfloat16, None),        # float32 answers for bfloat16 gradients: packed apart
])
def test_narrow_steps_equal_torch_step_after_step_and_after_a_restart(
        data_dir: Path, narrow: torch.dtype, answer: str | None, shards: int) -> None:
    steps = 4
    want, _ = local_run(narrow, steps + 2)
    sid = "narrow"
    query = "upcast=true" + (f"&params_dtype={answer}" if answer else "")
    live = LiveServer(_test_settings(data_dir=data_dir, durability="step"))
    with httpx.Client(base_url=live.start(), timeout=60) as http:
        create(http, sid, shards)
        for k in range(steps):
            got = step(http, sid, grads_of(k, narrow), query)
            sent = {n: t if answer is None or t.element_size() <= 2
                    else t.to(getattr(torch, answer)) for n, t in want[k].items()}
            assert_same(got, sent, f"answer of step {k}")
            assert_same(master(http, sid), want[k], f"master weights after step {k}")
    live.stop()
    # the log's replay widens the logged narrow gradients the same way
    again = LiveServer(_test_settings(data_dir=data_dir, durability="step"))
    with httpx.Client(base_url=again.start(), timeout=60) as http:
        assert_same(master(http, sid), want[steps - 1], "after a restart")
        for k in range(steps, steps + 2):
            step(http, sid, grads_of(k, narrow), query)
        assert_same(master(http, sid), want[steps + 1], "steps after the restart")
    again.stop()


@pytest.mark.parametrize("shards", [1, 2])
def test_pushed_narrow_gradients_add_to_a_narrow_step(server: str, shards: int) -> None:
    """A push (kept for the next step) and a step, both widened: the step's gradient is the
    sum, as a local run that adds the two widened gradients; sharded or not."""
    params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
    opt = torch.optim.Adam(list(params.values()), lr=1e-2)
    with httpx.Client(base_url=server, timeout=60) as http:
        create(http, "pushed", shards)
        for k in range(3):
            pushed, stepped = grads_of(2 * k, torch.bfloat16), grads_of(2 * k + 1,
                                                                          torch.bfloat16)
            r = http.post("/v1/sessions/pushed/grads?upcast=true",
                          content=safetensors.torch.save(pushed),
                          headers={"Content-Type": BINARY})
            assert r.status_code in (200, 202, 204), r.text
            got = step(http, "pushed", stepped, "upcast=true&params_dtype=bfloat16")
            for n, p in params.items():
                p.grad = pushed[n].to(p.dtype) + stepped[n].to(p.dtype)
            opt.step()
            assert_same(got, {n: p.detach().to(torch.bfloat16) if p.element_size() > 2
                              else p.detach().clone() for n, p in params.items()},
                        f"answer of step {k}")
        assert_same(master(http, "pushed"), {n: p.detach() for n, p in params.items()},
                    "master weights")


def test_touched_answers_are_narrowed_too(server: str) -> None:
    """``?return=touched&params_dtype=bfloat16``: the parameters a step touched come back
    narrowed as ``?return=params`` would send them (they came back in their own dtype: the
    narrowing asked for was dropped without a word); the untouched ones are left out."""
    want, _ = local_run(torch.bfloat16, 2)
    with httpx.Client(base_url=server, timeout=60) as http:
        create(http, "touched")
        for k in range(2):
            got = step(http, "touched", grads_of(k, torch.bfloat16),
                       "upcast=true&return=touched&params_dtype=bfloat16")
            assert_same(got, {n: t.to(torch.bfloat16) if t.element_size() > 2 else t
                              for n, t in want[k].items()}, f"answer of step {k}")
        assert_same(master(http, "touched"), want[1], "master weights")
        only = {"w": grads_of(2, torch.bfloat16)["w"]}
        got = step(http, "touched", only, "upcast=true&return=touched&params_dtype=float16")
        params = {n: t.clone() for n, t in want[1].items()}
        _, opt = local_run(torch.bfloat16, 2)
        w = opt.param_groups[0]["params"][0]
        w.grad = only["w"].to(torch.float32)
        for p in opt.param_groups[0]["params"][1:]:
            p.grad = None
        opt.step()
        params["w"] = w.detach().clone()
        assert_same(got, {"w": params["w"].to(torch.float16)}, "answer of a step of w alone")
        assert_same(master(http, "touched"), params, "master weights after w alone")
