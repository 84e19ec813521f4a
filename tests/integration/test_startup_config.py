"""A configuration that cannot work ends ``python -m app`` (and ``uvicorn --factory
app.main:create_app``) with exit code 2 and ONE line on stderr naming the variable: no
traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.__main__ import main as app_main
from app.config import DEFAULT_TENANT, ConfigError, load_settings
from app.engine import front as embedded

pytestmark = pytest.mark.integration

BAD: list[tuple[dict[str, str], str, str]] = [
    ({"OPTSERVE_PORT": "abc"}, "OPTSERVE_PORT", "valid integer"),
    ({"OPTSERVE_PORT": "70000"}, "OPTSERVE_PORT", "65535"),
    ({"OPTSERVE_API_KEYS": "short-key:alice"}, "OPTSERVE_API_KEYS", "at least 16 characters"),
    ({"OPTSERVE_API_KEYS_FILE": "/nonexistent/keys"}, "OPTSERVE_API_KEYS_FILE",
     "No such file"),
    ({"OPTSERVE_DEVICE": "tpu"}, "OPTSERVE_DEVICE", "auto, cpu, cuda or cuda:N"),
    ({"OPTSERVE_DEVICE": "cuda:99"}, "OPTSERVE_DEVICE", "cuda:99 was asked for"),
    ({"OPTSERVE_DURABILITY": "sometimes"}, "OPTSERVE_DURABILITY", "'step', 'interval' or"),
    ({"OPTSERVE_LOG_LEVEL": "loud"}, "OPTSERVE_LOG_LEVEL", "'info'"),
    ({"OPTSERVE_CORS_ORIGINS": "example.com"}, "OPTSERVE_CORS_ORIGINS", "not an origin"),
    ({"OPTSERVE_STEP_CHUNK": "100"}, "OPTSERVE_STEP_CHUNK", "a multiple of 65536 elements"),
    ({"OPTSERVE_STEP_CHUNK": "98304"}, "OPTSERVE_STEP_CHUNK", "a multiple of 65536 elements"),
    ({"OPTSERVE_STEP_CHUNK": "-1"}, "OPTSERVE_STEP_CHUNK", "greater than or equal to 0"),
    ({"OPTSERVE_DATA_DIR": "/proc/optserve-cannot-be-here"}, "OPTSERVE_DATA_DIR",
     "cannot write there"),
]
if not torch.cuda.is_available():  # the plain case a laptop user meets
    BAD.append(({"OPTSERVE_DEVICE": "cuda"}, "OPTSERVE_DEVICE", "torch sees no CUDA device"))
# a real process for the variables the issue names (import-time failures show only there); the
# rest in-process through the same main(), which is much faster on a small machine
IN_A_PROCESS = {"OPTSERVE_PORT=abc", "OPTSERVE_API_KEYS=short-key:alice",
                "OPTSERVE_DEVICE=cuda", "OPTSERVE_DURABILITY=sometimes"}
IDS = ["=".join(next(iter(e.items()))) for e, _, _ in BAD]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    # cwd has no .env; port 0 so that a wrongly accepted configuration cannot collide
    clean.update({"OPTSERVE_PORT": "0", "OPTSERVE_DATA_DIR": str(cwd / "data"), **env})
    return subprocess.run(args, env=clean, cwd=cwd, capture_output=True, text=True, timeout=60)


def _assert_one_line(proc: subprocess.CompletedProcess[str], variable: str, words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"optserve: invalid configuration: {variable}"), lines[0]
    assert words in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("env,variable,words", BAD, ids=IDS)
def test_python_m_app_refuses_a_bad_setting_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        env: dict[str, str], variable: str, words: str) -> None:
    if "=".join(next(iter(env.items()))) in IN_A_PROCESS:
        _assert_one_line(_run([sys.executable, "-m", "app"], env, tmp_path), variable, words)
        return
    for k in [k for k in os.environ if k.startswith("OPTSERVE_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    for k, v in {"OPTSERVE_PORT": "0", "OPTSERVE_DATA_DIR": str(tmp_path / "data"),
                 **env}.items():
        monkeypatch.setenv(k, v)
    code = app_main()
    captured = capsys.readouterr()
    _assert_one_line(subprocess.CompletedProcess([], code, captured.out, captured.err),
                     variable, words)


def test_uvicorn_factory_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                 "--port", "0"], {"OPTSERVE_DURABILITY": "sometimes"}, tmp_path)
    _assert_one_line(proc, "OPTSERVE_DURABILITY", "'step', 'interval' or 'memory'")


def test_several_bad_settings_are_named_on_the_same_line(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("OPTSERVE_PORT", "x")
    monkeypatch.setenv("OPTSERVE_DURABILITY", "y")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("OPTSERVE_PORT='x': ") and "; OPTSERVE_DURABILITY='y': " in text


def test_device_values_that_work(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("auto", "auto"), ("CPU", "cpu"), (" cpu ", "cpu")]:
        monkeypatch.setenv("OPTSERVE_DEVICE", value)
        assert load_settings().device == expected


def test_api_key_errors_never_show_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_API_KEYS", "secret-but-short")  # 16 chars: fine
    assert load_settings().api_keys == "secret-but-short"
    from app.config import parse_keys
    with pytest.raises(ConfigError) as info:
        parse_keys("tiny-secret:alice", None)
    assert "tiny-secret" not in str(info.value) and "OPTSERVE_API_KEYS" in str(info.value)


def test_the_default_tenant_is_the_engines() -> None:
    assert DEFAULT_TENANT == embedded.DEFAULT_TENANT


def test_create_app_with_bad_keys_raises_rather_than_exits() -> None:
    """Only the factory called without settings (uvicorn --factory) ends the process."""
    from app.main import create_app
    from tests.conftest import _test_settings

    with pytest.raises(ConfigError, match="OPTSERVE_API_KEYS"):
        create_app(_test_settings(api_keys="too-short"))


def test_metrics_tenants_without_a_key_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``OPTSERVE_METRICS_TENANTS`` naming a tenant no API key has (a typo: ``monitorng``)
    would answer every key's ``/metrics`` with a 403, Prometheus' too: the server does not
    start, and says which name. Without keys the setting is moot (every request is the
    default tenant's) and left alone."""
    from app.main import create_app
    from tests.conftest import _test_settings

    keys = "k-default-0123456789:default,k-monitor-0123456789:monitoring"
    with pytest.raises(ConfigError, match="OPTSERVE_METRICS_TENANTS.*'monitorng'"):
        create_app(_test_settings(api_keys=keys, metrics_tenants="monitoring,monitorng"))
    create_app(_test_settings(api_keys=keys, metrics_tenants="monitoring"))
    create_app(_test_settings(metrics_tenants="monitoring"))
    monkeypatch.setenv("OPTSERVE_API_KEYS", keys)
    monkeypatch.setenv("OPTSERVE_METRICS_TENANTS", "monitorng")
    assert app_main(["--check-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OPTSERVE_METRICS_TENANTS" in err[0], err


def test_a_misspelt_setting_is_named_with_the_one_it_likely_meant(tmp_path: Path) -> None:
    """The settings ignore names they do not know: a typo would run the server at the
    default without a word. ``python -m app`` warns, naming the setting it likely meant, for
    the environment and for ``.env``; other tools' ``OPTSERVE_*`` names stay quiet."""
    (tmp_path / ".env").write_text("OPTSERVE_TORCH_THREAD=1\n")
    proc = _run([sys.executable, "-m", "app", "--check-config"],
                {"OPTSERVE_DURABILTY": "memory", "OPTSERVE_API_KEY": "the-sdk-key",
                 "OPTSERVE_PUBLISH_PORT": "8001", "OPTSERVE_TEST_MAX_BODY_MB": "1",
                 "OPTSERVE_BASE_URL": "http://127.0.0.1:1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "durability step" in proc.stdout  # the typo is not taken: the default runs
    warned = [line for line in proc.stderr.splitlines() if "is not a setting" in line]
    assert len(warned) == 2, proc.stderr
    assert "OPTSERVE_DURABILTY is not a setting" in warned[0]
    assert "did you mean OPTSERVE_DURABILITY?" in warned[0]
    assert "OPTSERVE_TORCH_THREAD is not a setting" in warned[1]
    assert "did you mean OPTSERVE_TORCH_THREADS?" in warned[1]


def test_the_factory_warns_about_a_misspelt_setting_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from app.main import create_app
    for k in [k for k in os.environ if k.startswith("OPTSERVE_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OPTSERVE_MAX_BODY", "2048")
    with caplog.at_level("WARNING", logger="optserve"):
        create_app()
    assert any("OPTSERVE_MAX_BODY is not a setting" in r.getMessage()
               and "did you mean OPTSERVE_MAX_BODY_MB?" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("args", [["--check-config"], []])
def test_python_m_app_refuses_the_other_engines_data_dir(
        args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A data directory with the embedded engine's sessions (its log of keyed deletes, here),
    and ``OPTSERVE_ENGINE=ray``: ``--check-config`` and the server both exit 2 in one line
    naming both engines, before Ray is reached or anything is written
    (:mod:`app.data_dir_engine`; the engines themselves: tests/unit/test_data_dir_engine.py)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tombstones.jsonl").write_text("")
    monkeypatch.setenv("OPTSERVE_DATA_DIR", str(data))
    monkeypatch.setenv("OPTSERVE_ENGINE", "ray")
    monkeypatch.setenv("OPTSERVE_PORT", "1")
    assert app_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"optserve: invalid configuration: OPTSERVE_DATA_DIR='{data}' "
                             "holds the embedded engine's sessions, and this server runs the "
                             "ray engine (OPTSERVE_ENGINE=ray)"), err
    assert sorted(p.name for p in data.iterdir()) == ["tombstones.jsonl"]
