"""The Ray engine's parts that need no cluster: tensors to numpy and back (bitwise, every
dtype, packed buffers), operation values through the wire form, the directory's exclusive
claims, resource checks, and the create check on stand-ins."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from app.api.requests import create_spec
from app.engine.directory import Directory
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops import ImportState, Overwrite, Push, SkipStep, Step
from app.engine.placement import check_resources, shape_key
from app.errors import Invalid
from app.wire.safetensors_body import pack
from tests.torch_reference import json_tensor

ray_host = pytest.importorskip("app.engine.ray_host")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
          torch.uint8, torch.bool]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_cross_bitwise(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 4) * 100).to(dtype)
    for x in (t, t[:, 1:3], t.reshape(-1)[0], torch.empty(0, 2, dtype=dtype)):
        back = ray_host.tensor_from_wire(ray_host.tensor_to_wire(x))
        assert back.dtype == x.dtype and back.shape == x.shape and bits(back) == bits(x)


def test_packed_parameters_cross_as_one_buffer() -> None:
    tensors = {"a": torch.randn(5), "b": torch.randn(2, 3).double(), "c": torch.randn(4).half(),
               "d": torch.randn(3).bfloat16(), "e": torch.empty(0)}
    wire = ray_host.packed_to_wire(pack(tensors))
    back = ray_host.packed_from_wire(wire)
    assert list(back) == list(pack(tensors))
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and bits(back[n]) == bits(t)
    assert bytes(back.buffer) == bytes(pack(tensors).buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_sparse_gradients_cross_as_sent(dtype: torch.dtype) -> None:
    """A row-sparse gradient (documented for steps and pushes on every engine) crosses to a
    host as sent: indices in their order, duplicates kept, coalesced or not (it was a 500)."""
    values = torch.randn(3, 4).to(dtype)
    raw = torch.sparse_coo_tensor(torch.tensor([[5, 1, 5]]), values, (8, 4),
                                  check_invariants=True)
    for t in (raw, raw.coalesce()):
        back = ray_host.tensor_from_wire(ray_host.tensor_to_wire(t))
        assert back.layout == torch.sparse_coo and back.shape == t.shape
        assert back.is_coalesced() == t.is_coalesced()
        assert torch.equal(back._indices(), t._indices())
        assert back.dtype == dtype and bits(back._values()) == bits(t._values())
    op = ray_host.op_from_wire(ray_host.op_to_wire(Push({"e": raw, "w": torch.randn(2)})))
    assert isinstance(op, Push) and torch.equal(op.grads["e"]._indices(), raw._indices())
    assert bits(op.grads["e"]._values()) == bits(values)


def test_operations_cross_as_values() -> None:
    g = {"w": torch.randn(3), "v": torch.randn(2).bfloat16()}
    for op in (Step(g, base_version=3, options={0: {"lr": 0.1}}), Overwrite(g),
               SkipStep({1: {"betas": [0.9, 0.99]}}),
               ImportState({"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": []})):
        back = ray_host.op_from_wire(ray_host.op_to_wire(op))
        assert type(back) is type(op) and back.kind == op.kind
        assert str(back.to_tree()) == str(op.to_tree())


def test_create_is_checked_on_standins() -> None:
    good = CreateSpec("Adam", [GroupSpec({"w": torch.randn(1000, 1000)}, {})], {"lr": 0.1})
    ray_host.check_create(good, "reject")
    for options, words in (({"lr": -1}, "Invalid learning rate"),
                           ({"betas": [1.5, 0.9]}, "beta")):
        with pytest.raises(Invalid, match=words):
            ray_host.check_create(CreateSpec("Adam", good.groups, options), "reject")
    muon = CreateSpec("Muon", [GroupSpec({"w": torch.randn(3, 4, 5)}, {})], {})
    with pytest.raises(Invalid):
        ray_host.check_create(muon, "reject")  # Muon's 2-D rule survives the stand-ins


@pytest.mark.parametrize("shards", [1, 2])
def test_lbfgs_is_refused_before_a_host_is_chosen(shards: int) -> None:
    """An LBFGS session on a Ray host was made and could never step (its steps are
    evaluations, which only the embedded host runs): the create is the 422."""
    spec = CreateSpec("LBFGS", [GroupSpec({"a": torch.ones(2), "b": torch.ones(2)}, {})],
                      {"lr": 0.1}, shards=shards)
    with pytest.raises(Invalid) as caught:
        ray_host.check_create(spec, "reject")
    assert caught.value.field == ("optimizer" if shards == 1 else "shards")


def test_directory_claims_are_exclusive(tmp_path: Path) -> None:
    for d in (Directory(tmp_path / "dir"), Directory(None)):
        wins: list[bool] = []

        def claim(i: int, d: Directory = d, wins: list[bool] = wins) -> None:
            wins.append(d.claim("t~x", {"i": i}))
        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
        assert d.keys("t~") == ["t~x"] and d.keys("u~") == []
        d.put("t~x", {"i": 99})
        assert d.get("t~x") == {"i": 99}
        d.note_created("t", "key-1", "fp", "t~x")
        assert d.created("t", "key-1") == {"key": "t~x", "fingerprint": "fp"}
        assert d.created("u", "key-1") is None
        d.remove("t~x")
        d.forget_created("t", "key-1", "t~x")  # kept, marked deleted (a retried create is a 409)
        assert d.get("t~x") is None
        assert d.created("t", "key-1") == {"key": "t~x", "fingerprint": "fp", "deleted": True}


@pytest.mark.parametrize(("value", "field"), [
    ([], "resources"), ({"cpus": 1}, "resources.cpus"), ({"num_gpus": -1}, "resources.num_gpus"),
    ({"num_gpus": 1.5}, "resources.num_gpus"), ({"num_cpus": True}, "resources.num_cpus"),
    ({"memory": 1.5}, "resources.memory"), ({"num_cpus": float("inf")}, "resources.num_cpus"),
    ({"resources": {"GPU": 1}}, "resources.resources"),
    ({"resources": {"a b": 1}}, "resources.resources"),
])
def test_bad_resources_are_422(value: Any, field: str) -> None:
    with pytest.raises(Invalid) as caught:
        check_resources(value)
    assert caught.value.field == field and caught.value.code == "invalid_resources"


def test_resources_normalized_and_shapes_compared() -> None:
    a = check_resources({"num_gpus": 0.25, "num_cpus": 1, "resources": {"b": 1, "a": 2}})
    assert a == {"num_cpus": 1.0, "num_gpus": 0.25, "resources": {"a": 2.0, "b": 1.0}}
    assert shape_key(a) == "num_cpus=1,num_gpus=0.25,a=2,b=1"
    assert shape_key(check_resources({"num_gpus": 0.25, "num_cpus": 1.0,
                                      "resources": {"a": 2, "b": 1}})) == shape_key(a)


def test_create_body_fields() -> None:
    body = {"optimizer": "SGD", "params": {"w": json_tensor(torch.ones(2))}, "shards": 2,
            "resources": {"num_gpus": 0.5}, "placement": "pack"}
    spec = create_spec(body)
    assert (spec.shards, spec.resources, spec.placement) == (2, {"num_gpus": 0.5}, "pack")
    for key, bad in (("shards", 0), ("shards", 65), ("shards", "2"), ("placement", "fill")):
        with pytest.raises(Invalid) as caught:
            create_spec({**body, key: bad})
        assert caught.value.field == key


def test_a_host_that_never_answers_is_passed_over_when_placing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placing a session asks each existing host of its shape how many sessions it holds,
    under a lock every create takes. A host that never answers (an actor Ray cannot place,
    left by a front killed mid-create) is passed over after ``PLACE_PING_TIMEOUT_S``: every
    create used to wait for it for good. A host that answers is still chosen."""
    import asyncio

    import orjson

    router = ray_host.RayRouter(ray_host.RayOptions(data_dir=tmp_path, placement="pack"))
    shape = {"num_cpus": 1.0}
    for name in ("h-stuck", "h-live"):
        (router.hosts_dir / name).mkdir()
        (router.hosts_dir / name / "host.json").write_bytes(orjson.dumps(
            {"name": name, "resources": shape, "placement": "pack", "created": 0.0}))

    class Host:
        def __init__(self, name: str) -> None:
            self.name = name

        async def call(self, method: str, *args: Any, **kw: Any) -> dict[str, Any]:
            assert method == "ping"
            if self.name == "h-stuck":
                await asyncio.Event().wait()  # never
            return {"sessions": 1}

    hosts = {n: Host(n) for n in ("h-stuck", "h-live")}
    monkeypatch.setattr(router, "_host", hosts.__getitem__)
    monkeypatch.setattr(router, "_host_names", lambda: list(hosts))
    monkeypatch.setattr(ray_host, "PLACE_PING_TIMEOUT_S", 0.2, raising=False)

    async def place() -> list[Any]:
        return await asyncio.wait_for(router._place(shape, "pack"), 10.0)
    chosen = asyncio.run(place())
    assert [h.name for h in chosen] == ["h-live"]


def test_a_host_slow_to_start_delays_only_the_creates_of_its_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new host is waited for (up to ``host_start_timeout_s``, 120 s by default) under the
    placement lock: one Ray cannot place (``{"num_gpus": 1}`` on a cluster without GPUs) used
    to hold every create of every shape for that long. The lock is now the shape's: a create
    of another shape is placed while the first still waits."""
    import asyncio

    import orjson

    router = ray_host.RayRouter(ray_host.RayOptions(data_dir=tmp_path, placement="pack"))
    cpu, gpu = {"num_cpus": 1.0}, {"num_gpus": 1.0}
    (router.hosts_dir / "h-cpu").mkdir()
    (router.hosts_dir / "h-cpu" / "host.json").write_bytes(orjson.dumps(
        {"name": "h-cpu", "resources": cpu, "placement": "pack", "created": 0.0}))

    class Host:
        def __init__(self, name: str) -> None:
            self.name = name

        async def call(self, method: str, *args: Any, **kw: Any) -> dict[str, Any]:
            return {"sessions": 1}

    started: list[str] = []

    async def new_host(resources: dict[str, Any], placement: str) -> Any:
        assert resources == gpu
        started.append("gpu")
        await asyncio.Event().wait()  # a host Ray cannot place: waits until its start times out
        raise AssertionError("never started")

    monkeypatch.setattr(router, "_host", lambda name: Host(name))
    monkeypatch.setattr(router, "_host_names", lambda: ["h-cpu"])
    monkeypatch.setattr(router, "_new_host", new_host)
    # a cluster of CPUs only (the placement asks Ray whether it has the shape's room free)
    import ray
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})

    async def run() -> tuple[list[str], bool, bool]:
        stuck = asyncio.create_task(router._place(gpu, "pack"))
        while not started:
            await asyncio.sleep(0.01)
        placed = await asyncio.wait_for(router._place(cpu, "pack"), 10.0)
        still_starting = not stuck.done()
        # a create of the same shape still waits for the host being started (it may be the
        # one to pack onto)
        same_shape = asyncio.create_task(router._place(gpu, "pack"))
        await asyncio.sleep(0.2)
        same_shape_waits = not same_shape.done() and started == ["gpu"]
        for task in (stuck, same_shape):
            task.cancel()
        await asyncio.gather(stuck, same_shape, return_exceptions=True)
        return [h.name for h in placed], still_starting, same_shape_waits

    names, still_starting, same_shape_waits = asyncio.run(run())
    assert names == ["h-cpu"]
    assert still_starting
    assert same_shape_waits
