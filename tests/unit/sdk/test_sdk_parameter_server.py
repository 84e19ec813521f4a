"""What the SDK sends in parameter-server mode (worker header, base version, long polls,
PATCH of the session's options) and how it reads the answers, against ``httpx.MockTransport``."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import optserve
from optserve import _safetensors as st
from tests.unit.sdk.test_sdk_requests import SESSION, Recorder, make


def step_response(request: httpx.Request) -> httpx.Response:
    meta = {"version": "3", "step": "3", "lr": "[0.5]", "skipped": "false",
            "sync": json.dumps({"workers": ["a", "b"], "expected": 2, "partial": False})}
    body = st.dumps({"w": optserve._tensors.to_wire(torch.zeros(2), "w")}, meta)
    return httpx.Response(200, content=body,
                          headers={"content-type": "application/octet-stream"})


def test_step_sends_worker_and_base_version_and_waits_without_read_timeout() -> None:
    rec = Recorder(step_response)
    with make(rec, timeout=5) as client:
        result = client.step("s1", {"w": torch.ones(2)}, worker="w3", base_version=2)
    req = rec.last
    assert req.headers["x-optserve-worker"] == "w3"
    assert req.url.params["base_version"] == "2"
    assert req.extensions["timeout"]["read"] is None  # a sync round may take a while
    assert req.extensions["timeout"]["connect"] == 5
    assert result.sync == {"workers": ["a", "b"], "expected": 2, "partial": False}
    assert result.version == 3 and result.staleness is None
    with make(Recorder(step_response)) as client:
        with pytest.raises(ValueError):
            client.step("s1", {"w": torch.ones(2)}, base_version=-1)
        with pytest.raises(ValueError):
            client.step("s1", {"w": torch.ones(2)}, worker="")


def test_plain_step_is_unchanged() -> None:
    rec = Recorder(step_response)
    with make(rec, timeout=5) as client:
        client.step("s1", {"w": torch.ones(2)})
    assert "x-optserve-worker" not in rec.last.headers
    assert "base_version" not in rec.last.url.params
    assert rec.last.extensions["timeout"]["read"] == 5


def test_long_poll_extends_the_read_timeout_by_the_capped_wait() -> None:
    def params(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"version": 7, "step": 7, "lr": [0.5], "params": {}})
    rec = Recorder(params)
    with make(rec, timeout=5) as client:
        got = client.get_params("s1", min_version=7, wait_s=500, binary=False)
    assert got.version == 7
    assert rec.last.url.params["min_version"] == "7"
    assert rec.last.url.params["wait_s"] == "500.0"
    assert rec.last.extensions["timeout"]["read"] == 5 + 60


def test_configure_session_patches_the_options_and_reads_the_description() -> None:
    described = {**SESSION, "sync": {"workers": 3, "reduce": "mean", "timeout_s": 60.0,
                                     "on_timeout": "fail", "pending": []},
                 "max_staleness": 2, "staleness_lr": "inverse"}
    rec = Recorder(lambda r: httpx.Response(200, json=described))
    with make(rec) as client:
        info = client.configure_session("s1", sync={"workers": 3}, max_staleness=2)
    assert rec.last.method == "PATCH" and rec.last.url.path == "/v1/sessions/s1"
    assert json.loads(rec.last.content) == {"sync": {"workers": 3}, "max_staleness": 2}
    assert info.sync is not None and info.sync["workers"] == 3
    assert (info.max_staleness, info.staleness_lr) == (2, "inverse")


def test_create_session_carries_the_parameter_server_options() -> None:
    rec = Recorder()
    with make(rec) as client:
        client.create_session("SGD", {"w": torch.zeros(2)}, binary=False,
                              sync={"workers": 4, "reduce": "sum"}, max_staleness=1)
    body = json.loads(rec.last.content)
    assert body["sync"] == {"workers": 4, "reduce": "sum"} and body["max_staleness"] == 1
    assert "staleness_lr" not in body
