"""``optserve history`` and ``optserve watch`` as real subprocesses against a live server, and
the SDK's scalars (``Client.step(scalars=)``, ``RemoteOptimizer`` sending its closure's loss,
over HTTP and over the same-host transport)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import optserve
from tests.integration.test_cli import cli, err, new_id, ok, out

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Any:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def stepped(client: optserve.Client, steps: int = 25) -> tuple[str, list[float]]:
    sid = new_id("hist")
    g = torch.Generator().manual_seed(3)
    client.create_session("SGD", param_groups=[{"params": {"w": torch.randn(8, generator=g)}},
                                               {"params": {"b": torch.randn(3, generator=g)},
                                                "lr": 0.05}],
                          options={"lr": 0.1, "momentum": 0.9}, id=sid)
    losses = []
    for k in range(steps):
        loss = 1.0 / (k + 1)
        losses.append(loss)
        r = client.step(sid, {"w": torch.randn(8, generator=g), "b": torch.randn(3, generator=g)},
                        return_params=False, scalars={"loss": loss, "acc": k % 2})
        assert r.metrics is not None and r.metrics["scalars"]["loss"] == loss
    return sid, losses


def test_history_csv_export_matches_the_server(live_server: str, client: optserve.Client,
                                               tmp_path: Path) -> None:
    sid, losses = stepped(client)
    dest = tmp_path / "run.csv"
    p = ok(cli("history", sid, "-o", str(dest), url=live_server))
    assert "wrote 25 rows" in err(p)
    rows = list(csv.DictReader(io.StringIO(dest.read_text())))
    assert len(rows) == 25
    assert [int(r["n"]) for r in rows] == list(range(1, 26))
    assert [int(r["step"]) for r in rows] == list(range(1, 26))
    assert [float(r["scalars.loss"]) for r in rows] == losses
    assert [float(r["lr.1"]) for r in rows] == [0.05] * 25
    h = client.history(sid)
    for name in ("grad_norm.0", "update_norm.1", "param_norm.0", "update_ratio.1", "time"):
        assert [float(r[name]) for r in rows] == h.columns[name], name

    # to stdout, a range and chosen fields; JSON by extension
    p = ok(cli("history", sid, "--since", "20", "--fields", "step,scalars.loss",
               url=live_server))
    lines = out(p).splitlines()
    assert lines[0] == "n,step,scalars.loss" and len(lines) == 6
    assert lines[1] == f"21,21,{losses[20]!r}"
    ok(cli("history", sid, "-o", str(tmp_path / "run.json"), "--points", "5",
           url=live_server))
    body = json.loads((tmp_path / "run.json").read_text())
    assert body["points"] == 5 and body["rows"] == 25
    assert max(body["columns"]["scalars.loss.max"]) == 1.0
    assert min(body["columns"]["scalars.loss.min"]) == losses[-1]

    bad = cli("history", sid, "--fields", "nope", url=live_server)
    assert bad.returncode == 1 and "(field: fields)" in err(bad)
    missing = cli("history", "no-such-session", url=live_server)
    assert missing.returncode == 1 and "404" in err(missing)


def test_watch_draws_the_curves(live_server: str, client: optserve.Client) -> None:
    sid, _ = stepped(client, steps=30)
    p = ok(cli("watch", sid, "--frames", "2", "--interval", "0.1", "--color", "never",
               url=live_server, env={"COLUMNS": "120", "LINES": "48"}))
    text = out(p)
    assert text.count(f"optserve watch {sid}") == 2  # two frames
    head = text.splitlines()[0]
    assert "30 steps" in head and "loss 0.03333" in head and "steps/s" in head
    for title in ("learning rate", "gradient norm", "update norm", "update / parameter norm",
                  "client scalars", "steps per second", "skipped steps"):
        assert title in text, title
    assert "group 0" in text and "loss" in text
    assert "(no data)" not in text.split("skipped steps")[0]  # every curve above is drawn
    assert any(ch in text for ch in "▘▝▖▗▚▞▀▄"), "no plotted points"
    missing = cli("watch", "no-such-session", "--frames", "1", url=live_server)
    assert missing.returncode == 1 and "404" in err(missing)


@pytest.mark.parametrize("transport", ["http", "local"])
def test_remote_optimizer_sends_the_closures_loss(live_server: str, transport: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with optserve.Client(live_server, transport=transport) as client, \
            optserve.RemoteOptimizer(model.parameters(), optimizer="Adam", client=client,
                                     lr=0.01) as opt:
        losses = []
        for k in range(3):
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            if k == 2:
                opt.record_scalars(accuracy=0.75)
            losses.append(float(opt.step(closure).detach()))
        h = client.history(opt.session_id, fields=["scalars"])
        assert h.columns["scalars.loss"] == losses
        assert h.columns["scalars.accuracy"] == [None, None, 0.75]
        assert all(math.isfinite(v) for v in losses)


def test_watch_draws_a_session_of_one_step(live_server: str, client: optserve.Client) -> None:
    """A run watched from its first step: each log-scale chart holds one value (here all ≤ 1,
    which plotext's flat range of value ± 1 cannot take the log of). It is drawn, not a
    traceback."""
    sid = new_id("watch1")
    client.create_session("SGD", {"x": torch.tensor([0.75])}, options={"lr": 0.5}, id=sid)
    r = client.step(sid, {"x": torch.tensor([0.5])}, return_params=False)
    assert r.metrics is not None
    norms = r.metrics["groups"][0]
    assert 0 < norms["update_norm"] <= 1 and 0 < norms["param_norm"] <= 1  # flat and ≤ 1
    p = cli("watch", sid, "--frames", "1", "--interval", "0.1", "--color", "never",
            url=live_server, env={"COLUMNS": "120", "LINES": "48"})
    assert p.returncode == 0, err(p)
    text = out(p)
    assert "Traceback" not in err(p)
    assert "1 steps" in text.splitlines()[0]
    for title in ("gradient norm", "update norm", "update / parameter norm", "parameter norm"):
        assert f"{title} (no data)" not in text and title in text, title


def test_history_json_of_infinite_norms_is_json(live_server: str, client: optserve.Client,
                                                tmp_path: Path) -> None:
    """An infinite norm (a step with an infinite gradient under ``nonfinite: "allow"``) is
    written as the server writes it, ``{"$float": "inf"}``, never as Python's ``Infinity``,
    which is no JSON (``JSON.parse``, jq and strict parsers refuse the file)."""
    sid = new_id("histinf")
    client.create_session("SGD", {"x": torch.tensor([1.0, 2.0])}, options={"lr": 0.1}, id=sid,
                          nonfinite="allow")
    client.step(sid, {"x": torch.tensor([math.inf, 1.0])}, return_params=False)
    served = httpx.get(f"{live_server}/v1/sessions/{sid}/history").json()
    assert served["columns"]["grad_norm.0"] == [{"$float": "inf"}]

    def strict(text: str) -> Any:
        def refuse(literal: str) -> Any:
            raise AssertionError(f"{literal} is not JSON")
        return json.loads(text, parse_constant=refuse)

    p = ok(cli("history", sid, "--format", "json", url=live_server))
    assert strict(out(p))["columns"] == served["columns"]
    dest = tmp_path / "run.json"
    ok(cli("history", sid, "-o", str(dest), url=live_server))
    assert strict(dest.read_text())["columns"] == served["columns"]


def test_history_to_a_path_it_cannot_write_is_a_usage_error(live_server: str,
                                                            client: optserve.Client,
                                                            tmp_path: Path) -> None:
    """``-o`` naming a directory, or a file in a missing one, is refused as ``export``
    refuses it (exit 2, before anything is asked of the server), and no temporary file is
    left beside it."""
    sid, _ = stepped(client, steps=2)
    (tmp_path / "out").mkdir()
    for dest, says in ((tmp_path / "out", "is a directory"),
                       (tmp_path / "missing" / "run.csv", "does not exist")):
        p = cli("history", sid, "-o", str(dest), url=live_server)
        assert p.returncode == 2 and says in err(p), err(p)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []
    ok(cli("history", sid, "-o", str(tmp_path / "out" / "run.csv"), url=live_server))
    assert sorted(os.listdir(tmp_path / "out")) == ["run.csv"]


def test_history_fields_naming_no_field_is_a_usage_error(live_server: str,
                                                         client: optserve.Client) -> None:
    """``--fields ""`` or ``--fields ,`` names no field: exit 2 before anything is asked of the
    server, as the server refuses ``?fields=`` naming none and the SDK ``fields=[]`` (it
    exported every field, and ``,`` ended in a traceback); an empty piece beside a name is
    only a separator."""
    sid, _ = stepped(client, steps=2)
    for fields in ("", ",", ",,"):
        p = cli("history", sid, "--fields", fields, url=live_server)
        assert p.returncode == 2, (fields, p.returncode, err(p))
        assert "names no field" in err(p) and "Traceback" not in err(p), err(p)
        assert out(p) == ""
    p = ok(cli("history", sid, "--fields", "step,,lr,", url=live_server))
    assert out(p).splitlines()[0] == "n,step,lr.0,lr.1"
