"""The same-host transport's socket where the temporary directory's path is long: a Unix
socket's path has at most 107 bytes, and a server whose ``TMPDIR`` was deeper than about 58
bytes (a CI runner's work folder) failed to start ("AF_UNIX path too long"). It makes its
socket directory in ``/tmp`` then; an ``OPTSERVE_LOCAL_DIR`` too long for a socket is refused
at start, naming the variable and the bound."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import httpx
import pytest

from app.config import ConfigError, load_settings
from app.transport import stale_dirs
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration


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
