"""``RemoteOptimizer`` under ``torch.distributed.checkpoint`` (DCP), as torchtitan, torchtune
and Lightning's model-parallel strategies checkpoint an optimizer: ``get_state_dict`` /
``get_optimizer_state_dict`` (whose ``_init_optim_state`` takes a step at lr 0 on zero
gradients when the state is empty), ``dcp.save`` / ``dcp.load`` in one process, and
``set_state_dict`` / ``set_optimizer_state_dict``, which hand ``load_state_dict`` a state dict
keyed by the parameters' fully qualified names (``"0.weight"``) instead of integer ids. torch's
``load_state_dict`` maps any ids by position, the SDK sent them as they were and the server
refused them (422 "params must be a list of integer ids"). Each run is compared, bitwise at
every step, with the same run on the local ``torch.optim`` optimizer, checkpoints crossed
remote to remote, local to remote and remote to local."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import optserve
from tests.integration import test_sdk_torch_integrations as integrations

pytestmark = [pytest.mark.integration,
              # (DCP in one process, without a process group, says so)
              pytest.mark.filterwarnings("ignore::UserWarning")]


client = integrations.client  # (the fixture and the model the SDK's integration tests use)
mlp = integrations.mlp


def make(client: optserve.Client | None) -> tuple[nn.Module, torch.optim.Optimizer,
                                                  lrs.LRScheduler]:
    model = mlp()
    groups = [{"params": model[0].parameters()},
              {"params": model[2].parameters(), "lr": 0.02}]
    opt = (torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1) if client is None else
           optserve.RemoteOptimizer(groups, "AdamW", client, lr=0.01, weight_decay=0.1))
    return model, opt, lrs.StepLR(opt, step_size=2, gamma=0.5)


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: lrs.LRScheduler,
          steps: range) -> list[Any]:
    snapshots = []
    for i in steps:
        x, y = integrations.data(i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        snapshots.append(([p.detach().clone() for p in model.parameters()],
                          copy.deepcopy(opt.state_dict()), sched.state_dict()))
    return snapshots


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_state_dict_of_a_fresh_optimizer_as_torchs(client: optserve.Client) -> None:
    """``get_optimizer_state_dict`` of an optimizer that never stepped: DCP's step at lr 0
    makes its state, keyed by names; the parameters stay as they were."""
    got = []
    for c in (None, client):
        model, opt, _ = make(c)
        got.append((get_optimizer_state_dict(model, opt),
                    [p.detach().clone() for p in model.parameters()],
                    [g["lr"] for g in opt.param_groups]))
    assert_same(got[0], got[1])
    assert sorted(got[1][0]["state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@pytest.mark.parametrize("first,then", [("remote", "remote"), ("local", "remote"),
                                        ("remote", "local")])
def test_a_dcp_checkpoint_resumes_as_torchs(client: optserve.Client, tmp_path: Path,
                                            first: str, then: str) -> None:
    expected = train(*make(None), range(8))
    model, opt, sched = make(client if first == "remote" else None)
    train(model, opt, sched, range(4))
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()},
                 checkpoint_id=tmp_path)
    model, opt, sched = make(client if then == "remote" else None)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    got = train(model, opt, sched, range(4, 8))
    for i, (want, have) in enumerate(zip(expected[4:], got, strict=True)):
        assert_same(want, have, f"step {i + 4}")


def test_set_optimizer_state_dict_in_memory_and_names_as_ids(client: optserve.Client) -> None:
    """``set_optimizer_state_dict`` of a local optimizer's named state dict, and
    ``load_state_dict`` of a state dict whose ids are names, as torch maps them: by position
    (each group's ids in order to its parameters)."""
    local_model, local, local_sched = make(None)
    train(local_model, local, local_sched, range(3))
    named = get_optimizer_state_dict(local_model, local)
    remote_model, remote, remote_sched = make(client)
    remote_model.load_state_dict(local_model.state_dict())
    set_optimizer_state_dict(remote_model, remote, named)
    remote_sched.load_state_dict(local_sched.state_dict())
    assert_same(local.state_dict(), remote.state_dict())
    # the same ids as torch.optim takes them by hand
    renamed = copy.deepcopy(local.state_dict())
    names = {i: f"p{i}" for i in range(4)}
    renamed["state"] = {names[i]: entry for i, entry in renamed["state"].items()}
    for group in renamed["param_groups"]:
        group["params"] = [names[i] for i in group["params"]]
    expected_model, expected, _ = make(None)
    expected.load_state_dict(renamed)
    remote.load_state_dict(renamed)
    assert_same(expected.state_dict(), remote.state_dict())
    assert_same(train(local_model, local, local_sched, range(3, 6)),
                train(remote_model, remote, remote_sched, range(3, 6)))


#: FSDP2 in one process (gloo, world size 1): torch's Adam takes the DTensor parameters and
#: steps; a RemoteOptimizer over them is refused before anything is sent
FULLY_SHARDED = """
import socket, sys, torch, torch.distributed as dist, optserve
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
try:
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    local = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 8)).sum().backward()
    local.step()
    with optserve.Client(sys.argv[1], max_retries=0) as client:
        try:
            optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=0.01)
        except TypeError as exc:
            print("TypeError:", exc)
finally:
    dist.destroy_process_group()
"""


def test_dtensor_parameters_are_refused_saying_why(client: optserve.Client,
                                                   live_server: str) -> None:
    """FSDP2's ``fully_shard`` (and tensor parallelism) make the parameters DTensors, each
    one process's shard: a ``TypeError`` naming the parameter and saying so, not
    ``.numpy()``'s ``RuntimeError`` about tensor subclasses; no session is made."""
    before = {s.id for s in client.list_sessions()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", FULLY_SHARDED, live_server], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "TypeError: param_groups[0].params['0']: a DTensor cannot be sent" in done.stdout
    assert {s.id for s in client.list_sessions()} == before
