"""The same-host transport's socket where the temporary directory's path is long: a Unix
socket's path has at most 107 bytes, and a server whose ``TMPDIR`` was deeper than about 58
bytes (a CI runner's work folder) failed to start ("AF_UNIX path too long"). It makes its
socket directory in ``/tmp`` then; an ``OPTSERVE_LOCAL_DIR`` too long for a socket is refused
at start, naming the variable and the bound. The suite's own servers (``tests/forked_server.py``)
start there too: multiprocessing's fork server, which makes its socket in the temporary
directory as well, is not used then."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from app.config import ConfigError, load_settings
from app.transport import stale_dirs
from tests.conftest import LiveServer, _test_settings
from tests.integration import test_runner_home as runner_home

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def socket_of(url: str) -> str:
    local = httpx.get(f"{url}/v1/transport", timeout=30).json()["local"]
    assert local is not None
    path: str = local["socket"]
    return path


def assert_answers(path: str) -> None:
    assert len(path.encode()) <= stale_dirs.MAX_SOCKET_PATH, path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(path)


def test_a_deep_temporary_directory_puts_the_socket_under_tmp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("t" * 80)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # (as TMPDIR=deep)
    assert not stale_dirs.fits(Path(tempfile.gettempdir()))
    live = LiveServer(_test_settings(durability="memory"))
    with live.serving() as url:
        path = socket_of(url)
        assert path.startswith(f"/tmp/{stale_dirs.PREFIX}"), path
        assert_answers(path)


def test_a_local_dir_at_the_bound_serves(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        parent = Path(short) / ("p" * (stale_dirs.MAX_PARENT_BYTES - len(short) - 1))
        assert len(str(parent)) == stale_dirs.MAX_PARENT_BYTES
        live = LiveServer(_test_settings(durability="memory", local_dir=parent))
        with live.serving() as url:
            path = socket_of(url)
            assert path.startswith(f"{parent}/{stale_dirs.PREFIX}"), path
            assert_answers(path)


def test_a_local_dir_too_long_for_a_socket_is_refused_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    long = "/tmp/" + "l" * stale_dirs.MAX_PARENT_BYTES
    monkeypatch.setenv("OPTSERVE_LOCAL_DIR", long)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("OPTSERVE_LOCAL_DIR='/tmp/lll"), message
    assert (f"must be at most {stale_dirs.MAX_PARENT_BYTES} bytes long, not {len(long)}: the "
            "same-host transport's socket") in message, message


CHILD = r"""
import signal, socket, sys, tempfile, time
from pathlib import Path

import httpx

from tests import forked_server

tmp, repo = Path(sys.argv[1]), Path(sys.argv[2])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = {"OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(port), "OPTSERVE_DEVICE": "cpu",
       "OPTSERVE_DATA_DIR": str(tmp / "data"), "OPTSERVE_DURABILITY": "memory",
       "OPTSERVE_WARM_UP": "0"}
server = forked_server.start(env, repo, tmp / "server.log")
try:
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, (tmp / "server.log").read_text(errors="replace")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/transport", timeout=5)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (tmp / "server.log").read_text(errors="replace")
        time.sleep(0.1)
    print(r.json()["local"]["socket"])
finally:
    server.send_signal(signal.SIGTERM)  # (a graceful stop removes its socket directory)
    server.wait(60)
"""


def test_the_suites_servers_start_under_a_deep_temporary_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("t" * 80)
    deep.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update(TMPDIR=str(deep),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "clients" / "python")]))
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(REPO)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    path = p.stdout.strip().splitlines()[-1]
    assert path.startswith(f"/tmp/{stale_dirs.PREFIX}"), p.stdout


def test_a_ray_engine_test_runs_under_a_deep_temporary_directory(tmp_path: Path) -> None:
    """Ray's sockets go under its temporary folder; the suite's clusters put it in /tmp."""
    deep = tmp_path / ("t" * 80)
    deep.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "PYTEST_ADDOPTS")}
    env["TMPDIR"] = str(deep)
    runner_home.runs_a_ray_engine_test(env)
