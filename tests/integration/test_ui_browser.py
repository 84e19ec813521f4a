"""The page at ``/ui`` in a real headless Chromium (tests/browser/ui.mjs), against a real server
with API keys for two tenants: the login form takes tenant A's key, the list shows A's session
and never B's, a click draws the charts, and what the charts hold (uPlot's own data) equals the
server's ``GET .../history`` JSON value for value. While the page stays open the test steps the
session 20 more times: the page catches up by polling (``?since=``) without a reload. Nothing
is requested from anywhere but the server, and the console stays clean. A 1280x800 screenshot
goes to the test's tmp_path and, when ``OPTSERVE_UI_SCREENSHOT`` names a path, there too (that
is how docs/ui.png is made: ``OPTSERVE_UI_SCREENSHOT=docs/ui.png``).

Needs Debian's chromium and playwright-core (tests/browser), installed by
scripts/bootstrap-browser when missing (the ``browser_ready`` fixture); never skips.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import torch

import optserve
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_browser_cors import (  # noqa: F401 - browser_ready: fixture
    BROWSER,
    browser_env,
    browser_ready,
)

pytestmark = pytest.mark.integration
KEY_A = "ui-tenant-a-key-0123456789"
KEY_B = "ui-tenant-b-key-9876543210"
SESSION_A = "alpha-adam-run"
SESSION_B = "beta-private-run-7f3a"  # must never show up on tenant A's page
FIRST, MORE = 200, 20


def losses(start: int, count: int) -> list[float]:
    return [round(2.0 * math.exp(-k / 60) + 0.05 * math.sin(k / 3), 6)
            for k in range(start, start + count)]


def step_a(client: optserve.Client, gen: torch.Generator, start: int, count: int) -> None:
    for loss in losses(start, count):
        r = client.step(SESSION_A, {"w": torch.randn(8, generator=gen),
                                    "b": torch.randn(3, generator=gen)},
                        return_params=False, scalars={"loss": loss})
        assert r.metrics is not None and r.metrics["scalars"]["loss"] == loss


def history(url: str) -> dict[str, Any]:
    """The full history (no downsampling) as the server's JSON, with tenant A's key."""
    r = httpx.get(f"{url}/v1/sessions/{SESSION_A}/history", timeout=30,
                  headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def read_line(proc: subprocess.Popen[str], stderr: IO[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        stderr.seek(0)
        pytest.fail(f"ui.mjs ended without an answer (rc {proc.returncode}):\n{stderr.read()}")
    out: dict[str, Any] = json.loads(line)
    assert "driverError" not in out, json.dumps(out, indent=1)[:20000]
    return out


def check_plots(seen: dict[str, Any], hist: dict[str, Any], steps: int) -> None:
    """What the charts hold, against the server's own history JSON."""
    cols = hist["columns"]
    assert hist["rows"] == steps and cols["n"] == list(range(1, steps + 1))
    plots = seen["plots"]
    # lr: per group the max and min series of each bucket (one step per bucket here)
    lr = plots["lr"]
    assert lr["labels"] == ["n", "group 0", "group 0 (min)", "group 1", "group 1 (min)"]
    x, g0max, g0min, g1max, g1min = lr["data"]
    assert x == cols["n"]
    assert g0max == g0min == cols["lr.0"]
    assert g1max == g1min == cols["lr.1"]
    assert g0max[-1] == cols["lr.0"][-1] and g0max[0] > g0max[-1]  # the cosine schedule
    assert g1max[-1] == cols["lr.1"][-1] and g1max[-1] < g0max[-1]
    loss = plots["scalars"]
    assert loss["labels"] == ["n", "loss", "loss (min)"]
    assert loss["data"][0] == cols["n"]
    assert loss["data"][1] == cols["scalars.loss"] == losses(0, steps)
    # the legend names each series once (a band's lower edge, "(min)", is not listed)
    assert seen["legends"]["lr"] == ["group 0", "group 1"], seen["legends"]
    assert seen["legends"]["grad"] == ["group 0", "group 1"], seen["legends"]
    assert seen["legends"]["scalars"] == ["loss"], seen["legends"]
    assert seen["legends"]["skipped"] == ["skipped", "nonfinite"], seen["legends"]
    assert seen["legends"]["rate"] == ["steps/s"], seen["legends"]
    grad = plots["grad"]
    assert grad["data"][1] == cols["grad_norm.0"] and grad["data"][3] == cols["grad_norm.1"]
    # every chart with data has a painted canvas
    assert set(plots) >= {"lr", "grad", "update", "ratio", "scalars", "skipped", "rate"}
    assert seen["empty"] == [], seen["empty"]
    assert len(seen["painted"]) >= len(plots) and all(n > 1000 for n in seen["painted"])
    ui = seen["ui"]
    assert ui["lastN"] == steps and ui["rows"] == steps and ui["points"] == steps
    assert ui["errors"] == []
    assert seen["status"].startswith(f"{steps} steps read · last n {steps} · {steps} points")
    assert seen["status"].endswith("· 7 charts"), seen["status"]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.mark.timeout(180)
def test_ui_page_in_a_browser(browser_ready: None, tmp_path: Path) -> None:  # noqa: F811
    started = time.monotonic()
    server = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha,{KEY_B}:beta"))
    url = server.start()
    try:
        gen = torch.Generator().manual_seed(7)
        with optserve.Client(url, api_key=KEY_A, transport="http", max_retries=0) as a, \
                optserve.Client(url, api_key=KEY_B, transport="http", max_retries=0) as b:
            a.create_session(
                "Adam", param_groups=[{"params": {"w": torch.randn(8, generator=gen)}},
                                      {"params": {"b": torch.randn(3, generator=gen)},
                                       "lr": 0.003}],
                options={"lr": 0.01}, id=SESSION_A,
                scheduler={"name": "CosineAnnealingLR",
                           "options": {"T_max": 300, "eta_min": 0.0001}})
            b.create_session("SGD", params={"v": torch.zeros(4)}, options={"lr": 0.1},
                             id=SESSION_B)
            b.step(SESSION_B, {"v": torch.ones(4)}, return_params=False)
            step_a(a, gen, 0, FIRST)
            setup_s = time.monotonic() - started
            before = history(url)

            shot = tmp_path / "ui.png"
            cfg = {"url": f"{url}/ui", "key": KEY_A, "session": SESSION_A, "first": FIRST,
                   "screenshot": str(shot), "timeoutMs": 20000}
            with tempfile.TemporaryFile("w+") as stderr:
                with subprocess.Popen(["node", str(BROWSER / "ui.mjs"), json.dumps(cfg)],
                                      cwd=BROWSER, env=browser_env(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
                    try:
                        first = read_line(proc, stderr)
                        step_a(a, gen, FIRST, MORE)  # while the page is open
                        assert proc.stdin is not None
                        proc.stdin.write(json.dumps({"until": FIRST + MORE}) + "\n")
                        proc.stdin.flush()
                        second = read_line(proc, stderr)
                        assert proc.wait(timeout=30) == 0
                    finally:
                        if proc.poll() is None:
                            proc.kill()
            after = history(url)
    finally:
        server.stop()
    print(f"\nui browser test: {time.monotonic() - started:.1f} s "
          f"(server and {FIRST + MORE} steps {setup_s:.1f} s, "
          f"page caught up {second['seenAfterMs'] / 1000:.1f} s after the last step)")

    # 1. without a key the page asks for one; with A's key it lists A's session only
    assert first["mainHiddenAtLogin"] is True
    listed = first["listed"]
    assert [r["id"] for r in listed["rows"]] == [SESSION_A]
    assert listed["rows"][0]["cells"] == [SESSION_A, "Adam", str(FIRST)]
    assert listed["count"] == "(1)"
    assert SESSION_B not in listed["text"] and "beta" not in listed["text"]
    assert listed["sessionKeyStored"] is True

    # 2. a click selects it and draws the charts: the plotted values are the server's
    drawn = first["drawn"]
    assert drawn["hash"] == f"#{SESSION_A}" and drawn["title"] == SESSION_A
    assert drawn["rows"][0]["selected"] is True
    assert drawn["facts"].startswith("Adam · 2 groups · cpu · metrics on"), drawn["facts"]
    assert drawn["chartTitles"][:2] == ["Learning rate", "Gradient norm"]
    check_plots(drawn, before, FIRST)

    # 3. 20 more steps while the page is open: it catches up by polling, without a reload
    updated = second["updated"]
    assert updated["marker"] == "no reload since"
    check_plots(updated, after, FIRST + MORE)
    assert updated["plots"]["lr"]["data"][1][-1] == after["columns"]["lr.0"][-1]
    assert updated["plots"]["lr"]["data"][1][-1] != before["columns"]["lr.0"][-1]
    assert updated["rows"][0]["cells"] == [SESSION_A, "Adam", str(FIRST + MORE)]
    assert updated["ui"]["polls"] > drawn["ui"]["polls"]
    assert SESSION_B not in updated["text"]

    # 4. every request went to the server, and each one worked but the key-less first list
    requests = second["requests"]
    assert [r for r in requests if not r["url"].startswith(f"{url}/")] == []
    assert all(SESSION_B not in r["url"] for r in requests)
    failed = [r for r in requests if r.get("failure") or (r.get("status") or 0) >= 400]
    assert [(r["phase"], r["url"], r.get("status")) for r in failed] == [
        ("login", f"{url}/v1/sessions", 401)], failed
    # the page polled with ?since=<the last n it had>, never reading everything again
    since = [int(parse_qs(urlsplit(r["url"]).query)["since"][0]) for r in requests
             if r["phase"] == "updated" and "/history?" in r["url"]]
    assert since and since == sorted(since) and FIRST <= since[0] and since[-1] <= FIRST + MORE
    assert FIRST + MORE in since or since[-1] > FIRST, since

    # 5. the console: only the browser's own line for that expected 401, nothing else
    errors = second["errors"]
    assert [(e["phase"], e["url"]) for e in errors] == [("login", f"{url}/v1/sessions")], errors
    assert "401" in errors[0]["text"]

    # 6. the screenshot: 1280x800, here and where OPTSERVE_UI_SCREENSHOT says
    assert png_size(shot) == (1280, 800)
    wanted = os.environ.get("OPTSERVE_UI_SCREENSHOT")
    if wanted:
        dest = Path(wanted).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
