"""The folders the server makes in its data directory (the directory itself where it is
missing, ``sessions/``, each session's folder and the rest) are its user's alone (0700): another
local user can neither list the session ids nor enter them. Their files were 0600 already; the
folders were made with the process's umask (0755 under the usual 022). A directory that
exists already (an operator's, a Docker volume's) keeps its mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def serve_and_step(data_dir: Path) -> None:
    live = LiveServer(_test_settings(data_dir=data_dir, durability="step"))
    with live.serving() as url, httpx.Client(base_url=url, timeout=60) as http:
        w = torch.tensor([1.0, -2.0])
        r = http.post("/v1/sessions", json={
            "id": "s", "optimizer": "SGD", "options": {"lr": 0.5},
            "params": {"w": {"dtype": "float32", "shape": [2], "data": w.tolist()}}})
        assert r.status_code == 201, r.text
        r = http.post("/v1/sessions/s/step", json={
            "grads": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 1.0]}}})
        assert r.status_code == 200, r.text
        assert r.json()["params"]["w"]["data"] == (w - 0.5).tolist()  # (torch's SGD: exact)


def test_folders_the_server_makes_are_its_users_alone(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        data_dir = tmp_path / "fresh" / "data"
        serve_and_step(data_dir)
    finally:
        os.umask(old)
    found = modes(data_dir)
    assert len(found) >= 3, found  # the directory, sessions/, the session's folder at least
    assert {k: oct(v) for k, v in found.items() if v != 0o700} == {}, found


def test_an_existing_data_directory_keeps_its_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o750)  # (an operator's choice)
    serve_and_step(data_dir)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o750
