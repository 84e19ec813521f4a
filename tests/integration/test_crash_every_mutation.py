"""Every acknowledged mutation survives ``kill -9``, by value, and a retry of it afterwards is
answered, not applied again.

One ``python -m app`` subprocess (durability ``step``) holds a session per mutation kind: create
(JSON and safetensors bodies), step, push, zero_grad, overwrite, add_param_group,
update_param_group, scheduler step (ReduceLROnPlateau with a metric; StepLR ``step_on:
manual``), import (JSON, safetensors, ``torch.save``), configure, delete, steps under nested
schedulers (SequentialLR warmup-then-cosine, ChainedScheduler), and a tensor lr default filled
in place (``$fill``: with a step, by a PATCH). Each session's mutation under
test is the last thing it gets: all of them are sent at once, each with an ``Idempotency-Key``,
and the server is killed with SIGKILL the moment the last 2xx arrives. After the restart on the
same data directory:

1. every one of those requests is sent again with its key: answered ``Idempotent-Replayed``;
2. every session equals, bitwise, an in-process ``torch.optim`` (+ ``lr_scheduler``) mirror to
   which the same acknowledged operations were applied: parameters, the exported optimizer and
   scheduler state, version, step, learning rates, accumulated gradient names, PS options;
3. one more step on every session, compared again.

The chain runs twice: the first kill leaves every operation in the log (replayed at start), the
second runs with a snapshot after every operation (restored from the snapshot alone). Three
server starts in all. The module's last test uploads a ``torch.save`` zip bomb to the same
server and measures its peak memory.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from tests.integration.test_durability import Proc, pull, session_dir
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    build_scheduler,
    from_wire,
    json_tensor,
    state_to_safetensors,
    to_wire,
    torch_bytes,
)

pytestmark = pytest.mark.integration

BINARY = "application/octet-stream"
SHAPES = {"w": (3, 4), "b": (4,)}
PS_KEYS = ("sync", "max_staleness", "staleness_lr")
Tensors = dict[str, torch.Tensor]


def to_json(obj: Any) -> str:
    return json.dumps(obj)


def st(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.torch.save(tensors, metadata=metadata)


def jt(tensors: Tensors) -> dict[str, Any]:
    return {n: json_tensor(t) for n, t in tensors.items()}


# --------------------------------------------------------------------------- the mirror

class Mirror:
    """A session as in-process torch: named params, the optimizer, the scheduler, the
    accumulator, the version and step counters, each operation applied as the server does."""

    def __init__(self, optimizer: str, groups: list[tuple[Tensors, dict[str, Any]]],
                 options: dict[str, Any], scheduler: dict[str, Any] | None = None) -> None:
        self.params: Tensors = {}
        torch_groups = []
        for tensors, opts in groups:
            named = [(n, t.detach().clone()) for n, t in tensors.items()]
            self.params.update(named)
            torch_groups.append({"params": named, **opts})
        self.opt: torch.optim.Optimizer = getattr(torch.optim, optimizer)(torch_groups, **options)
        self.sched: Any = build_scheduler(scheduler, self.opt) if scheduler else None
        default = "manual" if scheduler and scheduler["name"] == "ReduceLROnPlateau" else \
            "optimizer"
        self.per_step = scheduler is not None and scheduler.get("step_on", default) == \
            "optimizer"
        self.accum: Tensors = {}
        self.version = self.step_count = 0
        self.ps: dict[str, Any] = {"sync": None, "max_staleness": None, "staleness_lr": "none"}

    def step(self, grads: Tensors, lr_div: float | None = None) -> None:
        for n, p in self.params.items():
            a, g = self.accum.get(n), grads.get(n)
            total = a + g if a is not None and g is not None else (a if a is not None else g)
            p.grad = None if total is None else total.clone()
        groups = self.opt.param_groups
        saved = [g["lr"] for g in groups]
        if lr_div is not None:
            for g in groups:
                g["lr"] = g["lr"] / lr_div
        self.opt.step()
        for g, lr in zip(groups, saved, strict=True):
            g["lr"] = lr
        for p in self.params.values():
            p.grad = None
        if self.per_step:
            self.sched.step()
        self.accum.clear()
        self.version += 1
        self.step_count += 1

    def push(self, grads: Tensors) -> None:
        for n, g in grads.items():
            self.accum[n] = self.accum[n] + g if n in self.accum else g.clone()

    def overwrite(self, params: Tensors) -> None:
        with torch.no_grad():
            for n, t in params.items():
                self.params[n].copy_(t)
        self.version += 1

    def add_group(self, params: Tensors, options: dict[str, Any]) -> None:
        named = [(n, t.detach().clone()) for n, t in params.items()]
        self.opt.add_param_group({"params": named, **options})
        self.params.update(named)

    def import_state(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(copy.deepcopy({k: sd[k] for k in ("state", "param_groups")}))
        if "scheduler" in sd:
            self.sched.load_state_dict(copy.deepcopy(sd["scheduler"]))
        self.version += 1

    def state(self) -> dict[str, Any]:
        sd: dict[str, Any] = dict(self.opt.state_dict())
        if self.sched is not None:
            sd["scheduler"] = self.sched.state_dict()
        return sd

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.opt.param_groups]


def check_session(c: httpx.Client, sid: str, m: Mirror) -> None:
    """The session equals its mirror by value (bitwise tensors, exact scalars)."""
    d = c.get(f"/v1/sessions/{sid}")
    assert d.status_code == 200, (sid, d.text)
    desc = d.json()
    assert (desc["version"], desc["step"]) == (m.version, m.step_count), sid
    assert desc["lr"] == m.lrs(), sid
    assert desc["accumulated"] == sorted(m.accum), sid
    assert {k: desc[k] for k in PS_KEYS} == m.ps, sid
    version, got = pull(c, sid)
    assert version == m.version, sid
    assert_tensors_equal(got, m.params, f"{sid} params")
    r = c.get(f"/v1/sessions/{sid}/state_dict", params={"encoding": "b64"})
    assert r.status_code == 200, r.text
    assert_trees_equal(from_wire(r.json()), m.state(), f"{sid} state_dict")


def step_and_compare(c: httpx.Client, sid: str, m: Mirror, grads: Tensors,
                     lr_div: float | None = None, **params: Any) -> httpx.Response:
    r = c.post(f"/v1/sessions/{sid}/step", content=st(grads), params=params,
               headers={"Content-Type": BINARY, "Accept": BINARY})
    assert r.status_code == 200, (sid, r.text)
    m.step(grads, lr_div)
    assert int(r.headers["X-Optserve-Version"]) == m.version, sid
    assert_tensors_equal(safetensors.torch.load(r.content), m.params, f"{sid} step answer")
    return r


# --------------------------------------------------------------------------- the cases

@dataclass
class Sent:
    """A keyed request that was acknowledged: sent again after the restart."""

    method: str
    url: str
    status: int
    kwargs: dict[str, Any]


def send(c: httpx.Client, method: str, url: str, status: int, **kwargs: Any
         ) -> tuple[httpx.Response, Sent]:
    headers = {**kwargs.pop("headers", {}), "Idempotency-Key": uuid.uuid4().hex}
    r = c.request(method, url, headers=headers, **kwargs)
    assert r.status_code == status, (method, url, r.status_code, r.text)
    assert "Idempotent-Replayed" not in r.headers
    return r, Sent(method, url, status, {**kwargs, "headers": headers})


@dataclass
class Case:
    """One mutation kind: ``prepare`` (plain operations first), then ``final`` (the keyed
    mutation under test, sent together with every other case's right before the kill)."""

    name: str
    seed: int
    sessions: dict[str, Mirror] = field(default_factory=dict)
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def randn(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32
              ) -> Tensors:
        return {n: torch.randn(s, generator=self.gen).to(dtype) for n, s in shapes.items()}

    def grads(self, m: Mirror, names: list[str] | None = None) -> Tensors:
        return {n: torch.randn(p.shape, generator=self.gen).to(p.dtype)
                for n, p in m.params.items() if names is None or n in names}

    @property
    def sid(self) -> str:
        return self.name

    @property
    def m(self) -> Mirror:
        return self.sessions[self.sid]

    def create(self, c: httpx.Client, optimizer: str, options: dict[str, Any],
               scheduler: dict[str, Any] | None = None,
               groups: list[tuple[Tensors, dict[str, Any]]] | None = None) -> None:
        groups = groups or [(self.randn(SHAPES), {})]
        body: dict[str, Any] = {
            "id": self.sid, "optimizer": optimizer, "options": options,
            "param_groups": [{"params": jt(t), **o} for t, o in groups]}
        if scheduler is not None:
            body["scheduler"] = scheduler
        r = c.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        self.sessions[self.sid] = Mirror(optimizer, groups, options, scheduler)
        # (0, or past the last version of a session deleted under the id: app.engine.
        # last_versions)
        self.m.version = r.json()["version"]

    def step(self, c: httpx.Client) -> None:
        step_and_compare(c, self.sid, self.m, self.grads(self.m))

    def keyed_step(self, c: httpx.Client) -> Sent:
        g = self.grads(self.m)
        r, sent = send(c, "POST", f"/v1/sessions/{self.sid}/step", 200, content=st(g),
                       headers={"Content-Type": BINARY, "Accept": BINARY})
        self.m.step(g)
        assert_tensors_equal(safetensors.torch.load(r.content), self.m.params, self.sid)
        return sent

    def prepare(self, c: httpx.Client, phase: int) -> None:
        pass

    def final(self, c: httpx.Client, phase: int) -> Sent:
        raise NotImplementedError

    def after_restart(self, c: httpx.Client, phase: int) -> None:
        """Checks of this kind beyond the values (run before the values are compared)."""

    def cont(self, c: httpx.Client, phase: int) -> None:
        """One more step on every session after the restart."""
        for sid, m in self.sessions.items():
            step_and_compare(c, sid, m, self.grads(m))


ADAM = {"lr": 0.01, "betas": (0.9, 0.99)}


class CreateJson(Case):
    def final(self, c: httpx.Client, phase: int) -> Sent:
        groups = [(self.randn(SHAPES), {}), (self.randn({"v": (5,)}), {"lr": 0.003,
                                                                       "amsgrad": True})]
        body: dict[str, Any] = {
            "optimizer": "Adam", "options": ADAM,
            "param_groups": [{"params": jt(t), **o} for t, o in groups],
            "scheduler": {"name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}}}
        if phase == 0:
            body["id"] = self.sid
        r, sent = send(c, "POST", "/v1/sessions", 201, json=body)
        sid = r.json()["id"]  # phase 1: the server names it
        assert (sid == self.sid) == (phase == 0)
        self.sessions[sid] = Mirror("Adam", groups, ADAM, body["scheduler"])
        return sent


class CreateSafetensors(Case):
    def final(self, c: httpx.Client, phase: int) -> Sent:
        w = self.randn({"w": (3, 4)}, torch.float64)
        b = self.randn({"b": (4,)})
        options = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
        sched = {"name": "ExponentialLR", "options": {"gamma": 0.9}}
        meta = {"optimizer": "SGD", "options": to_json(options),
                "param_groups": to_json([{"params": ["w"]}, {"params": ["b"], "lr": 0.01}]),
                "scheduler": to_json(sched)}
        if phase == 0:
            meta["id"] = self.sid
        r, sent = send(c, "POST", "/v1/sessions", 201, content=st({**w, **b}, meta),
                       headers={"Content-Type": BINARY})
        self.sessions[r.json()["id"]] = Mirror("SGD", [(w, {}), (b, {"lr": 0.01})], options,
                                               sched)
        return sent


class Step(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM, {"name": "StepLR",
                                          "options": {"step_size": 1, "gamma": 0.7}})
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        return self.keyed_step(c)


class Push(Case):
    """Two pushes (the second under test) then, after the restart, a step that must add them
    to its own gradients."""

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM)
            self.step(c)
        g = self.grads(self.m, ["w"])
        assert c.post(f"/v1/sessions/{self.sid}/grads", content=st(g),
                      headers={"Content-Type": BINARY}).status_code == 200
        self.m.push(g)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        g = self.grads(self.m, None if phase == 0 else ["b"])
        kwargs: dict[str, Any] = ({"content": st(g), "headers": {"Content-Type": BINARY}}
                                  if phase == 0 else {"json": {"grads": jt(g)}})
        r, sent = send(c, "POST", f"/v1/sessions/{self.sid}/grads", 200, **kwargs)
        self.m.push(g)
        assert r.json()["accumulated"] == sorted(self.m.accum)
        return sent


class ZeroGrad(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM)
        g = self.grads(self.m)
        assert c.post(f"/v1/sessions/{self.sid}/grads", json={"grads": jt(g)}).status_code == 200
        self.m.push(g)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        _, sent = send(c, "POST", f"/v1/sessions/{self.sid}/zero_grad", 200)
        self.m.accum.clear()
        return sent


class Overwrite(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM, {"name": "StepLR", "options": {"step_size": 2}})
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        new = self.randn({"w": SHAPES["w"]} if phase == 0 else {"b": SHAPES["b"]})
        url = f"/v1/sessions/{self.sid}/params"
        if phase == 0:
            r, sent = send(c, "PUT", url, 200, json={"params": jt(new)})
        else:
            r, sent = send(c, "PUT", url, 200, content=st(new), headers={"Content-Type": BINARY})
        self.m.overwrite(new)
        assert int(r.headers["X-Optserve-Version"]) == self.m.version
        return sent


class AddGroup(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM)
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        url = f"/v1/sessions/{self.sid}/param_groups"
        if phase == 0:
            new, opts = self.randn({"c": (2, 2)}), {"lr": 0.003, "amsgrad": True}
            _, sent = send(c, "POST", url, 201, json={"params": jt(new), **opts})
        else:
            new, opts = self.randn({"d": (6,)}), {"lr": 0.002, "weight_decay": 0.01}
            _, sent = send(c, "POST", url, 201, content=st(new, {k: to_json(v) for k, v in
                                                                  opts.items()}),
                           headers={"Content-Type": BINARY})
        self.m.add_group(new, opts)
        return sent


class UpdateGroup(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            groups = [(self.randn({"w": (3, 4)}), {}), (self.randn({"b": (4,)}), {"lr": 0.05})]
            self.create(c, "Adam", ADAM, {"name": "StepLR", "options": {"step_size": 1,
                                                                        "gamma": 0.9}}, groups)
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        index, opts = ((1, {"lr": 0.02, "weight_decay": 0.1}) if phase == 0
                       else (0, {"betas": (0.8, 0.95), "eps": 1e-6}))
        _, sent = send(c, "PATCH", f"/v1/sessions/{self.sid}/param_groups/{index}", 200,
                       json=opts)
        self.m.opt.param_groups[index].update(opts)
        return sent


class FilledLr(Case):
    """A tensor lr given as the default (one tensor in torch: the defaults' and both groups')
    filled in place, as a client's scheduler fills it: a step's change with ``$fill`` (phase
    0, safetensors), a ``PATCH`` with it (phase 1). The defaults and every group follow."""

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            groups = [(self.randn({"w": (3, 4)}), {}), (self.randn({"b": (4,)}), {})]
            r = c.post("/v1/sessions", json={
                "id": self.sid, "optimizer": "Adam",
                "options": {"lr": json_tensor(torch.tensor(0.01))},
                "param_groups": [{"params": jt(t)} for t, _ in groups]})
            assert r.status_code == 201, r.text
            self.sessions[self.sid] = Mirror("Adam", groups, {"lr": torch.tensor(0.01)})
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        lr = self.m.opt.defaults["lr"]
        assert all(g["lr"] is lr for g in self.m.opt.param_groups)
        lr.fill_(lr * 0.5)  # (StepLR's fill: every group's lr too)
        change = {"lr": json_tensor(lr), "$fill": ["lr"]}
        if phase == 1:
            _, sent = send(c, "PATCH", f"/v1/sessions/{self.sid}/param_groups/1", 200,
                           json=change)
            return sent
        g = self.grads(self.m)
        r, sent = send(c, "POST", f"/v1/sessions/{self.sid}/step", 200,
                       content=st(g, {"param_groups": to_json({"0": change})}),
                       headers={"Content-Type": BINARY, "Accept": BINARY})
        self.m.step(g)
        assert_tensors_equal(safetensors.torch.load(r.content), self.m.params, self.sid)
        return sent

    def after_restart(self, c: httpx.Client, phase: int) -> None:
        d = c.get(f"/v1/sessions/{self.sid}").json()
        want = {"lr": self.m.opt.defaults["lr"]}
        for where in ("defaults", "param_groups.0", "param_groups.1"):
            held = d["defaults"] if where == "defaults" else d["param_groups"][int(where[-1])]
            assert_tensors_equal({"lr": from_wire(held["lr"])}, want, f"{self.sid} {where}")


class Plateau(Case):
    """ReduceLROnPlateau stepped by hand with a metric that gets worse: the lr halves."""

    SCHED = {"name": "ReduceLROnPlateau",
             "options": {"mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.0}}

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "SGD", {"lr": 0.1, "momentum": 0.9}, self.SCHED)
            self.step(c)
            self.sched_step(c, 1.0)

    def sched_step(self, c: httpx.Client, metric: float, key: bool = False) -> Sent | None:
        url = f"/v1/sessions/{self.sid}/scheduler/step"
        if key:
            r, sent = send(c, "POST", url, 200, json={"metric": metric})
        else:
            r, sent = c.post(url, json={"metric": metric}), None
            assert r.status_code == 200, r.text
        self.m.sched.step(metric)
        assert r.json()["lr"] == self.m.lrs()
        return sent

    def final(self, c: httpx.Client, phase: int) -> Sent:
        lrs = self.m.lrs()
        sent = self.sched_step(c, 2.0 + phase, key=True)
        assert self.m.lrs() == [lr * 0.5 for lr in lrs]  # the test means something
        assert sent is not None
        return sent


class ManualStepLR(Case):
    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM, {"name": "StepLR", "step_on": "manual",
                                          "options": {"step_size": 1, "gamma": 0.5}})
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        r, sent = send(c, "POST", f"/v1/sessions/{self.sid}/scheduler/step", 200)
        self.m.sched.step()
        assert r.json()["lr"] == self.m.lrs()
        return sent


@dataclass
class Import(Case):
    """A state dict from another run (optimizer + scheduler state), in one wire format."""

    fmt: str = "json"

    SCHED = {"name": "StepLR", "options": {"step_size": 3, "gamma": 0.5}}

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM, self.SCHED)
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        donor = Mirror("Adam", [(self.randn(SHAPES), {})], ADAM, self.SCHED)
        for _ in range(2 + phase):
            donor.step(self.grads(donor))
        sd = donor.state()
        url = f"/v1/sessions/{self.sid}/state_dict"
        if self.fmt == "json":
            _, sent = send(c, "PUT", url, 200, json=to_wire(sd))
        else:
            body = state_to_safetensors(sd) if self.fmt == "safetensors" else torch_bytes(sd)
            _, sent = send(c, "PUT", url, 200, content=body, params={"format": self.fmt},
                           headers={"Content-Type": BINARY})
        self.m.import_state(sd)
        return sent


class Configure(Case):
    """Parameter-server options: after the restart a too-stale push is refused (phase 0) and a
    stale one is applied with the lr divided by 1 + staleness (phase 1)."""

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            self.create(c, "Adam", ADAM)
            self.step(c)
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        opts: dict[str, Any] = ({"max_staleness": 1, "staleness_lr": "inverse"} if phase == 0
                                else {"max_staleness": 4})
        r, sent = send(c, "PATCH", f"/v1/sessions/{self.sid}", 200, json=opts)
        self.m.ps.update(opts)
        assert {k: r.json()[k] for k in PS_KEYS} == self.m.ps
        return sent

    def after_restart(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            r = c.post(f"/v1/sessions/{self.sid}/step", json={"grads": jt(self.grads(self.m))},
                       params={"base_version": self.m.version - 2})
            assert r.status_code == 409 and r.json()["code"] == "stale_gradient", r.text

    def cont(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            super().cont(c, phase)
            return
        r = step_and_compare(c, self.sid, self.m, self.grads(self.m), lr_div=2.0,
                             base_version=self.m.version - 1)
        assert r.headers["X-Optserve-Version"] == str(self.m.version)


class Delete(Case):
    """Deleted, killed: gone after the restart, its id free; made again and deleted again."""

    def prepare(self, c: httpx.Client, phase: int) -> None:
        self.create(c, "Adam", ADAM, {"name": "StepLR", "options": {"step_size": 1}})
        # made again after the kill -9 that followed its delete at version 1: past it
        assert self.m.version == (0 if phase == 0 else 2), self.m.version
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        _, sent = send(c, "DELETE", f"/v1/sessions/{self.sid}", 204)
        del self.sessions[self.sid]
        return sent

    def after_restart(self, c: httpx.Client, phase: int) -> None:
        r = c.get(f"/v1/sessions/{self.sid}")
        assert r.status_code == 404 and r.json()["code"] == "session_not_found", r.text
        listed = [s["id"] for s in c.get("/v1/sessions").json()["sessions"]]
        assert self.sid not in listed


class Nested(Case):
    """Steps under SequentialLR (linear warmup, then cosine: the last step crosses the
    milestone) or ChainedScheduler."""

    SCHEDULERS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "sequential": ("Adam", ADAM, {"name": "SequentialLR", "options": {
            "schedulers": [
                {"name": "LinearLR", "options": {"start_factor": 0.25, "total_iters": 2}},
                {"name": "CosineAnnealingLR", "options": {"T_max": 4}}],
            "milestones": [2]}}),
        "chained": ("SGD", {"lr": 0.1, "momentum": 0.9}, {"name": "ChainedScheduler", "options": {
            "schedulers": [
                {"name": "ConstantLR", "options": {"factor": 0.5, "total_iters": 2}},
                {"name": "ExponentialLR", "options": {"gamma": 0.9}}]}}),
    }

    def prepare(self, c: httpx.Client, phase: int) -> None:
        if phase == 0:
            optimizer, options, sched = self.SCHEDULERS[self.name]
            self.create(c, optimizer, options, sched)
            self.step(c)
        self.step(c)

    def final(self, c: httpx.Client, phase: int) -> Sent:
        return self.keyed_step(c)


def all_cases() -> list[Case]:
    cases: list[Case] = [
        CreateJson("create-json", 1), CreateSafetensors("create-st", 2), Step("step", 3),
        Push("push", 4), ZeroGrad("zero-grad", 5), Overwrite("overwrite", 6),
        AddGroup("add-group", 7), UpdateGroup("update-group", 8), Plateau("plateau", 9),
        ManualStepLR("steplr-manual", 10), Configure("configure", 11), Delete("delete", 12),
        Nested("sequential", 13), Nested("chained", 14), FilledLr("filled-lr", 15)]
    cases += [Import(f"import-{fmt}", 20 + i, fmt=fmt)
              for i, fmt in enumerate(("json", "safetensors", "torch"))]
    return cases


# --------------------------------------------------------------------------- the chain

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = Proc(tmp_path_factory.mktemp("crash") / "data")
    try:
        yield p
    finally:
        p.stop()


def mutate_then_kill(server: Proc, cases: list[Case], phase: int) -> list[Sent]:
    """Each case's preparation, then every case's mutation under test at once, then SIGKILL
    as soon as the last one is acknowledged."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for case in cases:
            case.prepare(c, phase)

    def final(case: Case) -> Sent:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return case.final(c, phase)
    with ThreadPoolExecutor(max_workers=8) as pool:
        sent = list(pool.map(final, cases))
    server.kill9()
    return sent


def verify_after_restart(server: Proc, cases: list[Case], sent: list[Sent], phase: int) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "refused" not in ready.json(), ready.text
        for case, s in zip(cases, sent, strict=True):
            r = c.request(s.method, s.url, **s.kwargs)
            assert r.status_code == s.status, (case.name, r.status_code, r.text)
            assert r.headers.get("Idempotent-Replayed") == "true", (case.name, r.headers)
        for case in cases:
            case.after_restart(c, phase)
        for case in cases:
            for sid, m in case.sessions.items():
                check_session(c, sid, m)
        for case in cases:
            case.cont(c, phase)
        for case in cases:
            for sid, m in case.sessions.items():
                check_session(c, sid, m)
        listed = sorted(s["id"] for s in c.get("/v1/sessions").json()["sessions"])
        assert listed == sorted(sid for case in cases for sid in case.sessions)
    assert not session_dir(server.data_dir, "delete").exists()


@pytest.mark.timeout(900)  # three server starts: a minute each on a loaded machine
def test_every_acknowledged_mutation_survives_kill9(server: Proc) -> None:
    cases = all_cases()
    server.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="100000")  # phase 0: everything in the log
    sent = mutate_then_kill(server, cases, 0)
    server.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="1")  # phase 1: a snapshot after everything
    verify_after_restart(server, cases, sent, 0)
    assert "logged operations replayed" in server.log()
    sent = mutate_then_kill(server, cases, 1)
    server.start()
    verify_after_restart(server, cases, sent, 1)


# --------------------------------------------------------------------------- zip bomb

BOMB = 256 << 20


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def peak_increase_mib(server: Proc, request: Any) -> tuple[httpx.Response, float]:
    """Run ``request()`` and measure how far the server's peak RSS rose above its RSS before
    (the peak is reset first through ``/proc/<pid>/clear_refs``)."""
    assert server.proc is not None
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = memory_kib(pid)
    assert before["VmHWM"] - before["VmRSS"] < 8 * 1024, ("the peak was not reset", before)
    r = request()
    after = memory_kib(pid)
    return r, (after["VmHWM"] - before["VmRSS"]) / 1024


def zip_bomb(legit: bytes) -> tuple[bytes, str, int]:
    """``legit`` (a torch.save file) with its first storage deflate-compressed and padded with
    zeros to 256 MiB (as the entry declares); and that entry's name and real size."""
    src = zipfile.ZipFile(io.BytesIO(legit))
    target = next(i for i in src.infolist() if i.filename.endswith("/data/0"))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info.filename)
            entry = zipfile.ZipInfo(info.filename)
            if info is not target:
                z.writestr(entry, data)
                continue
            entry.compress_type = zipfile.ZIP_DEFLATED
            with z.open(entry, "w") as w:
                w.write(data)
                zeros = bytes(1 << 20)
                for _ in range(BOMB >> 20):
                    w.write(zeros)
    return out.getvalue(), target.filename, target.file_size


def lie_about_size(body: bytes, name: str, size: int) -> bytes:
    """The zip with the uncompressed size of entry ``name`` replaced by ``size`` in its central
    directory record and its local header (the compressed stream still inflates to 256 MiB)."""
    out = bytearray(body)
    raw = name.encode()
    for sig, size_at, name_len_at, name_at in ((b"PK\x01\x02", 24, 28, 46),
                                               (b"PK\x03\x04", 22, 26, 30)):
        pos = out.find(sig)
        while pos != -1:
            n = struct.unpack_from("<H", out, pos + name_len_at)[0]
            if bytes(out[pos + name_at:pos + name_at + n]) == raw:
                struct.pack_into("<I", out, pos + size_at, size)
            pos = out.find(sig, pos + 4)
    assert zipfile.ZipFile(io.BytesIO(out)).getinfo(name).file_size == size
    return bytes(out)


def test_torch_zip_bomb_is_refused_before_it_expands(server: Proc) -> None:
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    sid = "bomb-target"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        case = Case(sid, 99)
        case.create(c, "Adam", ADAM)
        case.step(c)
        legit = c.get(f"/v1/sessions/{sid}/state_dict", params={"format": "torch"}).content
        url = f"/v1/sessions/{sid}/state_dict?format=torch"
        headers = {"Content-Type": BINARY}
        # the legitimate file imports (and loads torch.load's code before anything is measured)
        assert c.put(url, content=legit, headers=headers).status_code == 200
        case.m.version += 1
        honest, name, size = zip_bomb(legit)
        assert len(honest) < 512 * 1024
        for lie in (False, True):
            bomb = lie_about_size(honest, name, size) if lie else honest
            r, rise = peak_increase_mib(server, lambda b=bomb: c.put(url, content=b,
                                                                       headers=headers))
            print(f"zip bomb ({'lying sizes' if lie else 'declared sizes'}, {len(bomb)} bytes "
                  f"-> {BOMB >> 20} MiB): HTTP {r.status_code}, server peak RSS rose by "
                  f"{rise:.1f} MiB")
            assert rise < 32, f"the server's peak memory rose by {rise:.1f} MiB"
            if not lie:
                assert r.status_code == 422 and r.json()["code"] == "torch_file_too_large", \
                    r.text
            else:  # refused, or read only as far as declared: never expanded
                assert r.status_code in (200, 422), r.text
                if r.status_code == 200:
                    case.m.version += 1
        check_session(c, sid, case.m)
