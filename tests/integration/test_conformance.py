"""Conformance: every optimizer config in torch's own ``optim_db`` runs over HTTP and gives
bitwise the same parameters as an in-process ``torch.optim`` run, and its state travels both
ways (export -> local optimizer, local optimizer -> import) in JSON, safetensors and torch.save
formats. Every construction error torch's ``optim_db`` lists for options becomes a 4xx
problem+json carrying torch's own message, and leaves no session behind.
"""

from __future__ import annotations

import copy
import itertools
import re
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from app.engine import chunked, foreach_steps
from tests.conftest import ENGINES
from tests.torch_reference import (
    Reference,
    assert_tensors_equal,
    assert_trees_equal,
    from_wire,
    grad_stream,
    json_tensor,
    make_params,
    state_from_safetensors,
    state_to_safetensors,
    tensors_from_json,
    to_wire,
    torch_bytes,
    torch_load,
    torch_state_dict,
)

pytestmark = pytest.mark.integration

CLASSES = (
    "Adafactor", "Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "Muon",
    "NAdam", "RAdam", "RMSprop", "Rprop", "SGD",
)
SHAPES = {"weight": [4, 3], "bias": [4]}
MUON_SHAPES = {"weight": [4, 3], "proj": [3, 5]}  # Muon takes 2-D parameters only
STEPS, MORE_STEPS = 5, 3
STATE_FORMATS = ("json", "safetensors", "torch")
PROBLEM = "application/problem+json"


def untravelable(kwargs: dict[str, Any]) -> str | None:
    """Why these constructor kwargs cannot travel as JSON options (None when they can).

    The wire carries numbers, booleans, strings, null, lists (for tuples) and, for ``lr``
    only, a JSON tensor. Anything else (a tensor for another option, a Python callable,
    an object) has no JSON form in optserve's protocol."""
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            if key != "lr":
                return f"{key} is a tensor; only lr may be given as a JSON tensor"
            continue
        if isinstance(value, (list, tuple)):
            if any(isinstance(v, torch.Tensor) for v in value):
                return f"{key} holds tensors; only lr may be given as a JSON tensor"
            if not all(v is None or type(v) in (int, float) for v in value):
                return f"{key} holds non-numbers"
            continue
        if value is not None and type(value) not in (bool, int, float, str):
            return f"{key} is a {type(value).__name__}, which has no JSON form"
    return None


def params_untravelable(params: Any) -> str | None:
    """Why an OptimizerInput's ``params`` cannot be expressed as named JSON tensors."""
    if params is None:
        return None
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        return "params is not an iterable (a bare tensor); the wire always names params"
    tensors: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            inner = item.get("params")
            inner = [inner] if isinstance(inner, torch.Tensor) else list(inner or [])
            tensors.extend(inner)
        elif isinstance(item, torch.Tensor):
            tensors.append(item)
        else:
            return "named/unnamed param mixes: on the wire every parameter has a name"
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return "named/unnamed param mixes: on the wire every parameter has a name"
    if len({id(t) for t in tensors}) != len(tensors):
        return "the same tensor twice: on the wire each name is its own tensor"
    for t in tensors:
        if t.is_complex() or not t.is_floating_point() or t.layout != torch.strided:
            return f"{t.dtype} / {t.layout} parameters have no wire form"
    return None


def groups_for(cls: type[torch.optim.Optimizer], params: Any, seed: int
               ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Named parameter groups: the OptimizerInput's structure when it has one, else a small
    default (weight [4,3] and bias [4]; Muon: two 2-D tensors)."""
    gen = torch.Generator().manual_seed(seed)
    if params is None:
        shapes = MUON_SHAPES if cls.__name__ == "Muon" else SHAPES
        return [(make_params(shapes, seed), {})]
    groups: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    items = [params] if isinstance(params, dict) else list(params)
    loose: dict[str, torch.Tensor] = {}
    for gi, item in enumerate(items):
        if isinstance(item, dict):
            inner = item["params"]
            inner = [inner] if isinstance(inner, torch.Tensor) else list(inner)
            named = {f"g{gi}.p{j}": torch.randn(t.shape, generator=gen) for j, t in
                     enumerate(inner)}
            groups.append((named, {k: v for k, v in item.items() if k != "params"}))
        else:
            loose[f"p{gi}"] = torch.randn(item.shape, generator=gen)
    if loose:
        groups.insert(0, (loose, {}))
    return groups


# ----------------------------------------------------------------------------- the configs
def _collect() -> tuple[list[Any], list[tuple[str, str]], list[Any], list[tuple[str, str]],
                        list[Any]]:
    configs: list[Any] = []
    untravelable_options: list[Any] = []
    skipped: list[tuple[str, str]] = []
    errors: list[Any] = []
    skipped_errors: list[tuple[str, str]] = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in CLASSES:
            continue
        for i, oi in enumerate(info.optim_inputs_func("cpu", torch.float32)):
            case = f"{name}-{i}-{oi.desc}"
            why = untravelable(oi.kwargs) or params_untravelable(oi.params)
            if why:
                skipped.append((case, why))
            else:
                configs.append(pytest.param(info.optim_cls, oi, id=case))
        for i, err in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            oi = err.optimizer_error_input
            case = f"{name}-err{i}-{oi.desc}"
            if err.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR:
                why = "raised at step, not construction (complex parameters have no wire form)"
            elif not issubclass(err.error_type, Exception) or issubclass(
                    err.error_type, Warning):
                why = f"a {err.error_type.__name__}, not an error"
            else:
                why = untravelable(oi.kwargs)
                if not why and not oi.kwargs:
                    why = params_untravelable(oi.params)
                    why = f"about the params argument itself: {why}" if why else None
            if why:
                skipped_errors.append((case, why))
                if "JSON tensor" in why:
                    untravelable_options.append(pytest.param(info.optim_cls, oi, id=case))
            else:
                errors.append(pytest.param(info.optim_cls, err, id=case))
    return configs, skipped, errors, skipped_errors, untravelable_options


CONFIGS, SKIPPED, ERROR_CASES, SKIPPED_ERRORS, UNTRAVELABLE = _collect()

# What cannot travel, and why (checked below so a torch upgrade that changes this is seen):
# - no optimizer config is skipped: every kwarg in optim_inputs_func("cpu", float32) is a
#   number, bool, tuple of numbers or a tensor lr (sent as a JSON tensor);
# - error inputs with tensor betas (Adam/AdamW, 3 each) cannot travel: the protocol takes a
#   tensor for lr only;
# - error inputs about the params argument itself (a bare tensor, duplicate tensors, mixes of
#   named and unnamed params: 4 per class) have no wire form, since every parameter travels
#   as its own named tensor; the UserWarning one (duplicates in a group) is a warning, not
#   an error. Muon's "only 2D parameters" does travel (a 3-D tensor) and runs;
# - STEP_ERROR inputs (complex parameters for Adafactor and Muon) are not construction errors.
EXPECTED_SKIPPED_CONFIGS: list[str] = []
EXPECTED_SKIPPED_ERRORS = {"tensor betas": 6, "params argument": 4 * len(CLASSES),
                           "warning": len(CLASSES), "step": 2}


def test_config_inventory() -> None:
    print(f"\noptimizer configs: {len(CONFIGS)} run, {len(SKIPPED)} skipped")
    for case, why in SKIPPED:
        print(f"  skipped {case}: {why}")
    print(f"construction errors: {len(ERROR_CASES)} run, {len(SKIPPED_ERRORS)} skipped")
    for case, why in SKIPPED_ERRORS:
        print(f"  skipped {case}: {why}")
    assert {c.values[0].__name__ for c in CONFIGS} == set(CLASSES)
    assert [case for case, _ in SKIPPED] == EXPECTED_SKIPPED_CONFIGS
    kinds = {"tensor betas": 0, "params argument": 0, "warning": 0, "step": 0}
    for _, why in SKIPPED_ERRORS:
        if "betas" in why:
            kinds["tensor betas"] += 1
        elif "params argument" in why:
            kinds["params argument"] += 1
        elif "Warning" in why:
            kinds["warning"] += 1
        elif "at step" in why:
            kinds["step"] += 1
        else:
            pytest.fail(f"unexpected skip reason {why}")
    assert kinds == EXPECTED_SKIPPED_ERRORS
    assert len(CONFIGS) >= 80 and len(ERROR_CASES) >= 20


# ----------------------------------------------------------------------------- helpers
def create_body(cls: type[torch.optim.Optimizer], groups: list[tuple[dict[str, torch.Tensor],
                dict[str, Any]]], kwargs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "optimizer": cls.__name__,
        "options": to_wire(kwargs),
        "param_groups": [{"params": {n: json_tensor(t) for n, t in tensors.items()},
                          **to_wire(opts)} for tensors, opts in groups],
        **extra,
    }


def create(http: httpx.Client, body: dict[str, Any], ref: Reference | None = None) -> str:
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    desc = r.json()
    if ref is not None:  # the session's defaults and groups are torch's own
        assert_trees_equal(from_wire(desc["defaults"]), ref.optimizer.defaults, "defaults")
        groups = ref.optimizer.state_dict()["param_groups"]
        assert_trees_equal([{k: v for k, v in g.items() if k != "params"}
                            for g in from_wire(desc["param_groups"])],
                           [{k: v for k, v in g.items() if k != "params"} for g in groups],
                           "param_groups")
        assert desc["lr"] == ref.lrs()
    assert desc["optimizer"] == body["optimizer"]
    assert desc["version"] == 0 and desc["step"] == 0
    assert [g["params"] for g in desc["param_groups"]] == [
        list(g["params"]) for g in body["param_groups"]]
    return str(desc["id"])


def http_step(http: httpx.Client, sid: str, grads: dict[str, torch.Tensor], k: int
              ) -> dict[str, Any]:
    """One step; odd steps send and receive base64 tensors, even steps number lists."""
    b64 = k % 2 == 1
    r = http.post(f"/v1/sessions/{sid}/step", params={"encoding": "b64"} if b64 else None,
                  json={"grads": {n: json_tensor(g, b64=b64) for n, g in grads.items()}})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert r.headers["X-Optserve-Version"] == str(out["version"])
    assert r.headers["X-Optserve-Step"] == str(out["step"])
    return out


def export(http: httpx.Client, sid: str, fmt: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state_dict", params={"format": fmt})
    assert r.status_code == 200, r.text
    if fmt == "json":
        assert r.headers["content-type"].startswith("application/json")
        return torch_state_dict(from_wire(r.json()))
    assert r.headers["content-type"].startswith("application/octet-stream")
    if fmt == "safetensors":
        return state_from_safetensors(r.content)
    sd: dict[str, Any] = torch_load(r.content)
    return sd


def import_state(http: httpx.Client, sid: str, sd: dict[str, Any], fmt: str) -> httpx.Response:
    url = f"/v1/sessions/{sid}/state_dict"
    if fmt == "json":
        return http.put(url, json=to_wire(sd))
    body = state_to_safetensors(sd) if fmt == "safetensors" else torch_bytes(sd)
    return http.put(url, params={"format": fmt}, content=body,
                    headers={"Content-Type": "application/octet-stream"})


def without_names(sd: dict[str, Any]) -> dict[str, Any]:
    out = dict(sd)
    out["param_groups"] = [{k: v for k, v in g.items() if k != "param_names"}
                           for g in sd["param_groups"]]
    return out


def drop(grads: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Step 2 leaves the last parameter out: its grad is None and torch skips it."""
    if k == 2:
        return dict(itertools.islice(grads.items(), len(grads) - 1))
    return grads


# ----------------------------------------------------------------------------- the test
def run_config(http: httpx.Client, cls: type[torch.optim.Optimizer], params: Any,
               kwargs: dict[str, Any], seed: int) -> None:
    groups = groups_for(cls, params, seed)
    shapes = {n: list(t.shape) for tensors, _ in groups for n, t in tensors.items()}
    names = list(shapes)
    ref = Reference(cls, groups, kwargs)
    sid = create(http, create_body(cls, groups, kwargs), ref)
    sessions = [sid]
    try:
        stream = grad_stream(shapes, seed + 1)
        for k in range(STEPS):
            grads = drop(next(stream), k)
            out = http_step(http, sid, grads, k)
            ref.step(grads)
            assert (out["version"], out["step"]) == (k + 1, k + 1)
            assert out["skipped"] is False
            assert out["lr"] == ref.lrs()
            assert_tensors_equal(tensors_from_json(out["params"]), ref.params, f"step {k + 1}")

        # The exported state is torch's: same as the reference's own state_dict.
        local_sd = copy.deepcopy(ref.optimizer.state_dict())
        local_params = {n: p.detach().clone() for n, p in ref.params.items()}
        exports = {fmt: export(http, sid, fmt) for fmt in STATE_FORMATS}
        for fmt, sd in exports.items():
            assert [g["param_names"] for g in sd["param_groups"]] == [
                list(tensors) for tensors, _ in groups], fmt
            assert_trees_equal(without_names(sd), local_sd, f"export {fmt}")
            assert list(sd["state"]) == list(local_sd["state"]), f"export {fmt}: state order"

        # (a) exported state -> fresh local optimizer over copies of the current params.
        loaded = {}
        for fmt, sd in exports.items():
            local = Reference(cls, [({n: local_params[n] for n in tensors}, opts)
                                    for tensors, opts in groups], kwargs)
            local.optimizer.load_state_dict(sd)
            loaded[fmt] = local
        more = [next(stream) for _ in range(MORE_STEPS)]
        for k, grads in enumerate(more, start=STEPS):
            out = http_step(http, sid, grads, k)
            ref.step(grads)
            for local in loaded.values():
                local.step(grads)
            got = tensors_from_json(out["params"])
            assert_tensors_equal(got, ref.params, f"step {k + 1}")
            for fmt, local in loaded.items():
                assert_tensors_equal(local.params, got, f"loaded from {fmt}, step {k + 1}")

        # (b) a local optimizer's state_dict -> import into a new session, every format.
        for fmt in STATE_FORMATS:
            new_groups = [({n: local_params[n] for n in tensors}, opts)
                          for tensors, opts in groups]
            new = create(http, create_body(cls, new_groups, kwargs))
            sessions.append(new)
            r = import_state(http, new, copy.deepcopy(local_sd), fmt)
            assert r.status_code == 200, f"{fmt}: {r.text}"
            assert r.json()["version"] == 1
            assert_trees_equal(without_names(export(http, new, "json")), local_sd,
                               f"re-export after {fmt} import")
            for k, grads in enumerate(more, start=STEPS):
                out = http_step(http, new, grads, k)
            assert_tensors_equal(tensors_from_json(out["params"]), ref.params,
                                 f"imported via {fmt}, after {MORE_STEPS} steps")
        r = http.get(f"/v1/sessions/{sid}/params", params={"names": ",".join(names)})
        assert r.status_code == 200
        assert_tensors_equal(tensors_from_json(r.json()["params"]), ref.params, "pull")
    finally:
        for s in sessions:
            http.delete(f"/v1/sessions/{s}")


@pytest.mark.parametrize(("cls", "oi"), CONFIGS)
def test_optimizer_config(http: httpx.Client, cls: type[torch.optim.Optimizer],
                          oi: Any) -> None:
    seed = sum(map(ord, f"{cls.__name__}{oi.desc}"))
    run_config(http, cls, oi.params, oi.kwargs, seed)


#: a representative few configs (amsgrad, nesterov, a tensor lr, Adafactor's factored state)
#: that also run on the Ray engine
REPRESENTATIVE = ("Adam", "SGD", "Adafactor")
ON_EACH_ENGINE = [c for c in CONFIGS if c.id in (
    "Adam-4-amsgrad", "SGD-8-nesterov", "SGD-2-tensor lr", "Adafactor-0-default")]


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize(("cls", "oi"), ON_EACH_ENGINE)
def test_optimizer_config_on_each_engine(http: httpx.Client, cls: type[torch.optim.Optimizer],
                                         oi: Any) -> None:
    test_optimizer_config(http, cls, oi)


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_two_param_groups_on_each_engine(http: httpx.Client, name: str) -> None:
    test_two_param_groups(http, name)


@pytest.mark.parametrize("name", CLASSES)
def test_two_param_groups(http: httpx.Client, name: str) -> None:
    """Per-group options and two groups through steps, export and import."""
    cls = getattr(torch.optim, name)
    gen = torch.Generator().manual_seed(7)
    if name == "Muon":
        params = [{"params": [torch.randn(3, 2, generator=gen)]},
                  {"params": [torch.randn(2, 4, generator=gen), torch.randn(4, 4, generator=gen)],
                   "lr": 0.005}]
    else:
        params = [{"params": [torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)]},
                  {"params": [torch.randn(5, generator=gen)], "lr": 0.005}]
    run_config(http, cls, params, {}, seed=11)


# ----------------------------------------------------------------------------- errors
def session_ids(http: httpx.Client) -> set[str]:
    r = http.get("/v1/sessions")
    assert r.status_code == 200
    return {s["id"] for s in r.json()["sessions"]}


# Each error case as the session's options, and (where it has options) as a group's own.
ERROR_RUNS = [pytest.param(*case.values, where, id=f"{case.id}-{where}")
              for case in ERROR_CASES for where in ("options", "param_group")
              if where == "options" or case.values[1].optimizer_error_input.kwargs]


@pytest.mark.parametrize(("cls", "err", "where"), ERROR_RUNS)
def test_construction_error(http: httpx.Client, cls: type[torch.optim.Optimizer], err: Any,
                            where: str) -> None:
    """torch's construction error, as the 422's detail; given as the session's options or as a
    param group's own options (which torch itself never checks, but a session must)."""
    oi = err.optimizer_error_input
    # torch itself raises this (the case is real for this torch build).
    groups = groups_for(cls, oi.params, seed=3)
    with pytest.raises(err.error_type, match=err.error_regex):
        cls([{"params": list(t.values()), **o} for t, o in groups], **oi.kwargs)
    before = session_ids(http)
    sid = f"err-{cls.__name__}-{zlib.crc32(oi.desc.encode()):08x}"
    if where == "options":
        body = create_body(cls, groups, oi.kwargs, id=sid)
    else:
        body = create_body(cls, [(groups[0][0], {**groups[0][1], **oi.kwargs}), *groups[1:]],
                           {}, id=sid)
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["status"] == 422
    assert problem["type"] == f"urn:optserve:problem:{problem['code']}"
    assert problem["title"]
    assert re.search(err.error_regex, problem["detail"]), problem
    if oi.kwargs:
        assert problem["field"].startswith("options." if where == "options"
                                           else "param_groups.0."), problem
    assert http.get(f"/v1/sessions/{sid}").status_code == 404
    assert session_ids(http) == before


@pytest.mark.parametrize(("cls", "oi"), UNTRAVELABLE)
def test_untravelable_options_are_refused(http: httpx.Client, cls: type[torch.optim.Optimizer],
                                          oi: Any) -> None:
    """The skipped error inputs (tensor betas) sent anyway, as JSON tensors: a 422 naming the
    option, and no session."""
    groups = groups_for(cls, oi.params, seed=3)
    before = session_ids(http)
    r = http.post("/v1/sessions", json=create_body(cls, groups, oi.kwargs))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert re.match(r"options\.betas\.\d is a tensor: only lr may be given as a tensor",
                    problem["detail"]), problem
    assert problem["detail"].startswith(f"{problem['field']} is a tensor"), problem
    assert session_ids(http) == before


# ----------------------------------------------------------------------------- chunked steps
@pytest.fixture
def small_chunks(http: httpx.Client) -> Iterator[None]:
    """The embedded server in this process steps parameters of more than 5 elements chunk by
    chunk (``app.engine.chunked``; the weight [4, 3] in chunks of 5, 5 and 2)."""
    chunked.configure(5, smallest=6)
    yield
    chunked.configure(chunked.DEFAULT_CHUNK)


@pytest.fixture
def foreach_from_one(http: httpx.Client) -> Iterator[None]:
    """The embedded server in this process steps every group of at least one parameter with
    the optimizer's foreach twin where it may (``app.engine.foreach_steps``)."""
    foreach_steps.configure(1)
    yield
    foreach_steps.configure(foreach_steps.SMALLEST_GROUP)


@pytest.mark.parametrize(("cls", "oi"), [c for c in CONFIGS
                                         if c.values[0].__name__ in foreach_steps.SAME_CALLS])
def test_optimizer_config_stepped_foreach(foreach_from_one: None, http: httpx.Client,
                                          cls: type[torch.optim.Optimizer], oi: Any) -> None:
    """Every config of the optimizers whose foreach twin may step for their for-loop again,
    each group switched where the module allows: the same values, exports and imports."""
    test_optimizer_config(http, cls, oi)


@pytest.mark.parametrize(("cls", "oi"), [c for c in CONFIGS
                                         if c.values[0].__name__ in chunked.ELEMENTWISE])
def test_optimizer_config_stepped_in_chunks(small_chunks: None, http: httpx.Client,
                                            cls: type[torch.optim.Optimizer], oi: Any) -> None:
    """Every elementwise config again, its parameters stepped in chunks of odd sizes: the same
    values, exports and imports as torch's whole step."""
    test_optimizer_config(http, cls, oi)
