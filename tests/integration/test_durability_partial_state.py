"""An Adagrad state imported without some parameters' entries (torch makes them afresh at their
next step) survives ``kill -9``: restored from a snapshot that holds the partial state and an
import's log record replayed over it, the session's state and its next steps equal an
in-process ``torch.optim.Adagrad`` that loaded the same state dict."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
import torch

from app.engine import persist
from app.engine.store import read_log
from app.wire.tree import tree_from_json, tree_to_json
from tests.integration import test_durability as durability
from tests.integration.test_durability import Proc, bitwise, session_dir

pytestmark = pytest.mark.integration

NAMES, SIZES = ("w", "b", "v"), (5, 3, 4)


proc = durability.proc  # (a server process of its own data directory, stopped after)


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return [torch.randn(n, generator=g) for n in SIZES]


def test_an_adagrad_state_lacking_parameters_survives_kill9(proc: Proc) -> None:
    """Two steps, then an import whose state leaves parameter 1 out and gives parameter 2 an
    empty entry after parameter 0's, twice: after ``kill -9`` the session is rebuilt from the
    snapshot taken after the first import and the second import's record; its exported state
    equals torch's (entries, their order, bits), and so do its next steps."""
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(n, generator=g) for n in SIZES]
    local = [p.clone() for p in params]
    opt = torch.optim.Adagrad(local, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.3)
    body = {"id": "ada", "optimizer": "Adagrad",
            "options": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.3},
            "params": {n: tree_to_json(p, b64=True) for n, p in zip(NAMES, params, strict=True)}}
    steps = iter(range(100))

    def step_both(c: httpx.Client) -> None:
        gs = grads(next(steps))
        for p, grad in zip(local, gs, strict=True):
            p.grad = grad.clone()
        opt.step()
        r = c.post("/v1/sessions/ada/step", json={"grads": {
            n: tree_to_json(grad, b64=True) for n, grad in zip(NAMES, gs, strict=True)}})
        assert r.status_code == 200, r.text
        for n, p in zip(NAMES, local, strict=True):
            assert bitwise(tree_from_json(r.json()["params"][n], n), p), n

    def check(c: httpx.Client) -> None:
        sd = tree_from_json(c.get("/v1/sessions/ada/state_dict").json(), "sd")
        mine = opt.state_dict()
        assert [int(k) for k in sd["state"]] == list(mine["state"])
        for pid, entry in mine["state"].items():
            assert sd["state"][str(pid)].keys() == entry.keys(), pid
            for key, value in entry.items():
                assert bitwise(sd["state"][str(pid)][key], value), (pid, key)

    def import_partial(c: httpx.Client) -> None:
        partial: dict[str, Any] = copy.deepcopy(opt.state_dict())
        partial["state"] = {0: partial["state"][0], 2: {}}
        opt.load_state_dict(copy.deepcopy(partial))
        wire = tree_to_json(partial, b64=True)
        wire["state"] = {str(k): v for k, v in wire["state"].items()}
        r = c.put("/v1/sessions/ada/state_dict", json=wire)
        assert r.status_code == 200, r.text

    # a snapshot every 4 records: create, two steps and the import; the second import is the
    # one record the log holds after it
    proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="4")
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.post("/v1/sessions", json=body).status_code == 201
        step_both(c)
        step_both(c)
        import_partial(c)
        check(c)
        import_partial(c)  # (the same state again)
    folder = session_dir(proc.data_dir, "ada")
    assert (folder / "snapshot.bin").exists()
    assert [persist.decode_record(r).op.kind for r in read_log(folder / "wal.bin")[0]] == [
        "import"]
    proc.kill9()
    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.get("/readyz").json().get("refused") is None
        check(c)
        for _ in range(2):
            step_both(c)
        check(c)
