"""Trees a hostile client shapes to cost the server more than their size, against a real uvicorn
on 127.0.0.1: each is a 4xx problem naming the field, leaves the session exactly as it was,
and costs the server memory and time in proportion to the body.

- A list under a long key (``{"k" * 10000: [0] * 50000}``, 150 KB) in a state import (JSON or
  ``torch.save``), a step's or a create's options: the walks over it wrote every node's dotted
  path as they met it, each a copy of the key above it, all of a level's at once: 500 MB held
  for this body (a 300 KB one held 6 GB, the server out of memory; a 640 KB JSON import 8 GB).
  Here the Python heap (``tracemalloc``, the server runs in this process) may grow by 64 MB at
  most while it is answered.
- A ``torch.save`` file nested a million levels deep (a pickle of 2 MB: a mark and a tuple
  opcode a level) took a minute of CPU to refuse, its paths as long as it was deep; a state
  nested past 64 levels is now refused as a JSON one is, 422 ``invalid_state`` "state is
  nested too deeply" (half a million levels here: a million is past the pickle the session's
  state needs, below).
- A ``torch.save`` file whose pickle holds a million empty dicts (6 MB) took 150 MB of heap
  and seconds of CPU to unpickle: a pickle past what the session's state needs (its
  parameters, their names, its groups) is a 422 ``torch_file_too_large`` before torch reads it.
- A ``torch.save`` file of the session's own export and a million empty zip entries (108 MB)
  was imported: 11 s of server CPU and 800 MB of memory for the smallest session (zipfile and
  torch's reader each make an object per entry), every entry ignored. A file with more entries
  than its pickle could reference (the pickle bounded as above, 16 bytes a storage's reference)
  is a 422 ``torch_file_too_large`` before any reader walks them.
- A nested tensor (``torch.nested``) in a ``torch.save`` import was a 500 (torch gives no
  sizes for it); it is a 422 ``state_mismatch`` naming it, as a sparse or meta tensor is.
"""

from __future__ import annotations

import copy
import io
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import torch
from safetensors.torch import save as st_save

from app.api.requests import PICKLE_SLACK
from tests.torch_reference import Reference, assert_tensors_equal, json_tensor, tensor_from_json

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
OPTIONS = {"lr": 0.01}
HEAP_LIMIT = 64 << 20  # what answering one such body may add to the Python heap
WIDE = {"k" * 10_000: [0] * 50_000}  # 150 KB of JSON; a path per item was 500 MB
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=120) as client:
        yield client


def stepped_session(http: httpx.Client) -> tuple[str, Reference]:
    """Adam under StepLR, stepped once (state for its parameter), and the same in torch."""
    w = torch.randn(3, generator=torch.Generator().manual_seed(5))
    scheduler = {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}}
    r = http.post("/v1/sessions", json={"optimizer": "Adam", "options": OPTIONS,
                                        "params": {"w": json_tensor(w)}, "scheduler": scheduler,
                                        "durability": "memory"})
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    ref = Reference(torch.optim.Adam, [({"w": w}, {})], OPTIONS)
    ref.scheduler = torch.optim.lr_scheduler.StepLR(ref.optimizer, step_size=2, gamma=0.5)
    grad = torch.randn(3, generator=torch.Generator().manual_seed(6))
    assert http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(grad)}}
                     ).status_code == 200
    ref.step({"w": grad})
    return sid, ref


def snapshot(http: httpx.Client, sid: str) -> tuple[Any, ...]:
    """What a refused operation must leave as it was: the parameters, the exported state and the
    description (its version, revision and options)."""
    info = http.get(f"/v1/sessions/{sid}").json()
    for moving in ("last_used", "idle_s"):
        info.pop(moving, None)
    return (http.get(f"/v1/sessions/{sid}/params").json(),
            http.get(f"/v1/sessions/{sid}/state_dict").json(), info)


def torch_export(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state_dict?format=torch")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = torch.load(io.BytesIO(r.content), weights_only=True)
    return state


def torch_file(state: object) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def with_pickle(file: bytes, old: bytes, new: bytes) -> bytes:
    """``file`` (a ``torch.save`` zip) with ``old`` in its pickle replaced by ``new``."""
    src = zipfile.ZipFile(io.BytesIO(file))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, new)
            dst.writestr(item, data)
    return out.getvalue()


def with_entries(file: bytes, n: int) -> bytes:
    """``file`` (a ``torch.save`` zip) with ``n`` empty entries more, which nothing reads."""
    src = zipfile.ZipFile(io.BytesIO(file))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        for i in range(n):
            dst.writestr(f"archive/junk/{i}", b"")
    return out.getvalue()


def refused(http: httpx.Client, sid: str, send: Callable[[], httpx.Response], code: str,
            field: str, *, status: int = 422) -> dict[str, Any]:
    """``send``'s answer is the problem ``code`` naming ``field`` (by its start where it
    ends in a long key), and the session is as it was."""
    before = snapshot(http, sid)
    r = send()
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = r.json()
    assert problem["code"] == code, problem
    assert problem["field"].startswith(field), problem["field"][:200]
    assert {"type", "title", "detail"} <= problem.keys()
    assert snapshot(http, sid) == before
    return problem


def steps_as_torch(http: httpx.Client, sid: str, ref: Reference) -> None:
    """A step after the refusals gives torch's parameters: nothing of them was kept."""
    grad = torch.randn(3, generator=torch.Generator().manual_seed(7))
    r = http.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": json_tensor(grad)}})
    assert r.status_code == 200, r.text
    ref.step({"w": grad})
    assert_tensors_equal({"w": tensor_from_json(r.json()["params"]["w"])}, ref.params)


def heap_growth(act: Callable[[], object]) -> int:
    """How far the Python heap of this process (the server's too) rose above where it was
    while ``act`` ran."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        act()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- tests
def test_nested_tensor_in_a_torch_import_is_a_422(http: httpx.Client) -> None:
    sid, ref = stepped_session(http)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch calls nested tensors a prototype)
        nested = torch.nested.nested_tensor([torch.zeros(3)])
    for put in (["state", 0, "exp_avg"], ["param_groups", 0, "lr"], ["scheduler", "base_lrs", 0]):
        state = torch_export(http, sid)
        holder = state
        for key in put[:-1]:
            holder = holder[key]
        holder[put[-1]] = nested
        body = torch_file(state)
        refused(http, sid, lambda b=body: http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                                                   content=b, headers=OCTET),
                "state_mismatch", "state_dict." + ".".join(map(str, put)))
    steps_as_torch(http, sid, ref)


def test_a_torch_state_nested_half_a_million_levels_is_refused_at_64(
        http: httpx.Client) -> None:
    sid, ref = stepped_session(http)
    state = torch_export(http, sid)
    mark = "@@deep@@"
    state["state"][0]["exp_avg"] = mark
    # MARK, then TUPLE: a tuple in a tuple ... half a million deep, in 1 MB (a million, 2 MB,
    # is past the pickle this session's state needs: torch_file_too_large before torch reads it)
    levels = 500_000
    text = mark.encode()
    body = with_pickle(torch_file(state), b"X" + len(text).to_bytes(4, "little") + text,
                       b"(" * levels + b"t" * levels)
    problem = refused(http, sid, lambda: http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                                                  content=body, headers=OCTET),
                      "invalid_state", "state_dict.state.0.exp_avg.0.0.0")
    assert problem["detail"] == "state is nested too deeply"
    assert problem["field"].count(".") == 65  # the first node below the 64th level
    steps_as_torch(http, sid, ref)


def test_a_long_key_over_a_long_list_costs_its_size(http: httpx.Client) -> None:
    sid, ref = stepped_session(http)
    exported = http.get(f"/v1/sessions/{sid}/state_dict").json()
    cases: list[tuple[str, Callable[[], httpx.Response], str, str]] = []

    def import_json(where: str) -> tuple[Callable[[], httpx.Response], str]:
        state = copy.deepcopy(exported)
        if where == "top":
            state["zz"] = WIDE
            field = "state_dict.zz"
        else:
            state["scheduler"]["base_lrs"] = [WIDE]
            field = "state_dict.scheduler.base_lrs.0"
        body = orjson.dumps(state)
        return (lambda: http.put(f"/v1/sessions/{sid}/state_dict", content=body,
                                 headers={"Content-Type": "application/json"})), field

    for where in ("top", "scheduler"):
        send, field = import_json(where)
        cases.append((f"JSON import ({where})", send, "state_mismatch", field))
    torch_state = torch_export(http, sid)
    torch_state["zz"] = WIDE
    torch_body = torch_file(torch_state)
    cases.append(("torch.save import",
                  lambda: http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                                   content=torch_body, headers=OCTET),
                  "state_mismatch", "state_dict.zz"))
    # a safetensors import: the tree in its __metadata__'s optserve_state skeleton
    exported_bin = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": OCTET[
        "Content-Type"]}).content
    n = int.from_bytes(exported_bin[:8], "little")
    header = orjson.loads(exported_bin[8:8 + n])
    skeleton = orjson.loads(header["__metadata__"]["optserve_state"])
    skeleton["zz"] = WIDE
    header["__metadata__"]["optserve_state"] = orjson.dumps(skeleton).decode()
    head = orjson.dumps(header)
    st_body = len(head).to_bytes(8, "little") + head + exported_bin[8 + n:]
    cases.append(("safetensors import",
                  lambda: http.put(f"/v1/sessions/{sid}/state_dict", content=st_body,
                                   headers=OCTET),
                  "state_mismatch", "state_dict.zz"))
    step_body = orjson.dumps({"grads": {}, "param_groups": {"0": {"lr": WIDE}}})
    cases.append(("a step's options",
                  lambda: http.post(f"/v1/sessions/{sid}/step", content=step_body,
                                    headers={"Content-Type": "application/json"}),
                  "invalid_option", "param_groups.0.lr"))
    patch_body = orjson.dumps({"betas": [WIDE, 0.9]})
    cases.append(("a group's PATCH",
                  lambda: http.patch(f"/v1/sessions/{sid}/param_groups/0", content=patch_body,
                                     headers={"Content-Type": "application/json"}),
                  "invalid_option", "param_groups.0.betas"))
    for what, send, code, field in cases:
        grown = heap_growth(lambda s=send, c=code, f=field: refused(http, sid, s, c, f))
        assert grown < HEAP_LIMIT, f"{what}: the heap grew by {grown >> 20} MB"
    create_body = orjson.dumps({"optimizer": "SGD", "options": {"lr": 0.1, "momentum": WIDE},
                                "params": {"w": json_tensor(torch.zeros(2))}})
    answers: list[httpx.Response] = []
    grown = heap_growth(lambda: answers.append(
        http.post("/v1/sessions", content=create_body,
                  headers={"Content-Type": "application/json"})))
    assert answers[0].status_code == 422, answers[0].text[:300]
    assert answers[0].json()["field"] == "options.momentum", answers[0].text[:300]
    assert grown < HEAP_LIMIT, f"a create's options: the heap grew by {grown >> 20} MB"
    steps_as_torch(http, sid, ref)



def test_a_torch_pickle_of_many_small_objects_is_bounded_by_the_session(
        http: httpx.Client) -> None:
    """A ``torch.save`` file whose pickle holds a million empty dicts (6 MB of pickle, 2
    bytes a dict) was unpickled before anything looked at it: 150 MB of heap and 10 to 20 s
    of CPU for the smallest session, up to 25 times any pickle under the 16 MB of slack every
    session's file has. The pickle is now bounded by what the session's state needs (its
    parameters, their names, its groups): 422 ``torch_file_too_large`` before torch reads it,
    the session as it was. A session's own export at that bound's edge (many parameters with
    names of 512 characters) imports back, and steps as torch then."""
    sid, ref = stepped_session(http)
    state = torch_export(http, sid)
    state["param_groups"][0]["zz"] = [{} for _ in range(1_000_000)]
    body = torch_file(state)
    grown = heap_growth(lambda: refused(
        http, sid, lambda: http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                                    content=body, headers=OCTET),
        "torch_file_too_large", "body"))
    assert grown < HEAP_LIMIT, f"the heap grew by {grown >> 20} MB"
    steps_as_torch(http, sid, ref)

    names = [f"{i:04d}" + "n" * 508 for i in range(2000)]  # (each the longest name taken)
    values = {n: torch.randn(2, generator=torch.Generator().manual_seed(i))
              for i, n in enumerate(names)}
    r = http.post("/v1/sessions", json={"optimizer": "Adam", "options": {"amsgrad": True},
                                        "params": {n: json_tensor(v) for n, v in values.items()},
                                        "durability": "memory"})
    assert r.status_code == 201, r.text[:300]
    wide = r.json()["id"]
    mine = Reference(torch.optim.Adam, [(values, {})], {"amsgrad": True})
    grads = {n: torch.full((2,), 0.5) for n in names}
    assert http.post(f"/v1/sessions/{wide}/step", json={"grads": {
        n: json_tensor(g) for n, g in grads.items()}}).status_code == 200
    mine.step(grads)
    exported = http.get(f"/v1/sessions/{wide}/state_dict?format=torch").content
    with zipfile.ZipFile(io.BytesIO(exported)) as zf:  # (past what the slack alone takes)
        assert sum(e.file_size for e in zf.infolist() if e.filename.endswith(".pkl")) \
            > PICKLE_SLACK
    r = http.put(f"/v1/sessions/{wide}/state_dict?format=torch", content=exported, headers=OCTET)
    assert r.status_code == 200, r.text[:300]
    r = http.post(f"/v1/sessions/{wide}/step", json={"grads": {
        n: json_tensor(g) for n, g in grads.items()}})
    assert r.status_code == 200, r.text[:300]
    mine.step(grads)
    assert_tensors_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()},
                         mine.params)


def test_a_torch_file_of_many_zip_entries_is_bounded_by_the_session(
        http: httpx.Client) -> None:
    """The session's own ``torch.save`` export with 100,000 empty zip entries added (10 MB;
    a million took 11 s of server CPU and 800 MB) is a 422 ``torch_file_too_large`` naming
    the body, with the number of entries taken as its ``limit``, before zipfile or torch's
    reader walks them, the session as it was; the same export with a few entries added
    (nothing reads them) imports, and the session steps as torch then."""
    sid, ref = stepped_session(http)
    exported = http.get(f"/v1/sessions/{sid}/state_dict?format=torch").content
    body = with_entries(exported, 100_000)
    problems: list[dict[str, Any]] = []
    grown = heap_growth(lambda: problems.append(refused(
        http, sid, lambda: http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                                    content=body, headers=OCTET),
        "torch_file_too_large", "body")))
    assert grown < HEAP_LIMIT, f"the heap grew by {grown >> 20} MB"
    assert 12 <= problems[0]["limit"] < 100_000, problems[0]
    assert "entries" in problems[0]["detail"], problems[0]
    r = http.put(f"/v1/sessions/{sid}/state_dict?format=torch",
                 content=with_entries(exported, 100), headers=OCTET)
    assert r.status_code == 200, r.text[:300]
    steps_as_torch(http, sid, ref)


def test_an_unknown_top_level_key_is_refused_before_its_tree_is_walked(
        http: httpx.Client) -> None:
    """A state dict's unknown top-level key is refused before anything walks what it holds:
    two million empty objects under one took 6 s of walks (the conversion, then the check of
    every value on the device worker) before the refusal. A tree under it that those walks
    refuse (nested past 64 levels, an integer past int64) now gets the unknown key's refusal,
    as JSON, as safetensors and as a ``torch.save`` file, and the session is as it was."""
    sid, ref = stepped_session(http)
    state = http.get(f"/v1/sessions/{sid}/state_dict").json()
    deep: Any = 0
    for _ in range(80):
        deep = [deep]
    for hidden in (deep, [2**63]):
        body = orjson.dumps({**state, "zz": hidden})
        refused(http, sid, lambda b=body: http.put(f"/v1/sessions/{sid}/state_dict", content=b,
                                                   headers={"Content-Type": "application/json"}),
                "state_mismatch", "state_dict.zz")
    skeleton = {**state, "zz": [deep, {"$tensor": "x"}]}
    binary = st_save({"x": torch.zeros(1)},
                     metadata={"optserve_state": orjson.dumps(skeleton).decode()})
    refused(http, sid, lambda: http.put(f"/v1/sessions/{sid}/state_dict", content=binary,
                                        headers=OCTET), "state_mismatch", "state_dict.zz")
    exported = torch_export(http, sid)
    refused(http, sid, lambda: http.put(
        f"/v1/sessions/{sid}/state_dict?format=torch",
        content=torch_file({**exported, "zz": [2**70]}), headers=OCTET),
        "state_mismatch", "state_dict.zz")
    steps_as_torch(http, sid, ref)
