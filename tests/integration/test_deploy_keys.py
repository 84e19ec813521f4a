"""The Docker Compose set-up with API keys, as docs/docker.md tells it: scripts/make-keys writes
.env and Prometheus' key file; the server takes those keys, Prometheus' file opens /metrics
(tested against a real server, as Prometheus would send it), and the one-shot config check
compose runs first passes with keys and refuses (exit 2, one line) without them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app.config import parse_keys
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MAKE_KEYS = ROOT / "scripts" / "make-keys"


def make_keys(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MAKE_KEYS), "--env-file", str(tmp / ".env"), "--keys-dir",
                           str(tmp / "keys"), *extra], capture_output=True, text=True,
                          timeout=60)


def env_keys(env_file: Path) -> str:
    lines = [ln for ln in env_file.read_text().splitlines()
             if ln.startswith("OPTSERVE_API_KEYS=")]
    assert len(lines) == 1, lines
    return lines[0].split("=", 1)[1]


def test_make_keys_then_prometheus_scrapes_with_its_key(tmp_path: Path) -> None:
    p = make_keys(tmp_path)
    assert p.returncode == 0, p.stderr
    spec = env_keys(tmp_path / ".env")
    keys = parse_keys(spec, None)
    assert sorted(keys.values()) == ["default", "monitoring"]
    client_key = next(k for k, t in keys.items() if t == "default")
    metrics_file = tmp_path / "keys" / "metrics-key"
    metrics_key = metrics_file.read_text().strip()  # Prometheus trims it the same way
    assert keys[metrics_key] == "monitoring"
    assert f"your API key (tenant default): {client_key}" in p.stdout
    assert stat.S_IMODE(metrics_file.stat().st_mode) & 0o044 == 0o044  # Prometheus' user reads
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    # the rest of .env.example came along (made from it)
    assert "OPTSERVE_PUBLISH_ADDR" in (tmp_path / ".env").read_text()

    tenants = [ln.split("=", 1)[1] for ln in (tmp_path / ".env").read_text().splitlines()
               if ln.startswith("OPTSERVE_METRICS_TENANTS=")]
    assert tenants == ["monitoring"]
    server = LiveServer(_test_settings(api_keys=spec, metrics_tenants=tenants[0]))
    url = server.start()
    try:
        scrape = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {metrics_key}"})
        assert scrape.status_code == 200 and "optserve_sessions" in scrape.text
        assert httpx.get(f"{url}/metrics").status_code == 401
        # the server-wide totals are the monitoring tenant's only
        assert httpx.get(f"{url}/metrics", headers={
            "Authorization": f"Bearer {client_key}"}).status_code == 403
        mine = httpx.get(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {client_key}"})
        assert mine.status_code == 200 and mine.json() == {"sessions": []}
    finally:
        server.stop()

    # no silent replacement of existing keys; --force replaces them
    again = make_keys(tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr
    assert env_keys(tmp_path / ".env") == spec
    forced = make_keys(tmp_path, "--force")
    assert forced.returncode == 0 and env_keys(tmp_path / ".env") != spec
    for name in ("OPTSERVE_API_KEYS=", "OPTSERVE_METRICS_TENANTS="):
        assert len([ln for ln in (tmp_path / ".env").read_text().splitlines()
                    if ln.startswith(name)]) == 1


def test_compose_and_prometheus_files_agree_on_the_key_path() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "optserve")
    path = job["authorization"]["credentials_file"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["prometheus"][
        "volumes"]}
    directory, name = path.rsplit("/", 1)
    assert mounts[directory] == "./deploy/keys" and name == "metrics-key"
    # the key directory exists in a fresh clone (so the bind mount is a directory), its keys
    # are never committed
    assert (ROOT / "deploy" / "keys" / ".gitignore").read_text().splitlines()[1:] == \
        ["*", "!.gitignore"]
    assert "# Loopback by default: the API has no authentication" not in (
        ROOT / "docker-compose.yml").read_text()


def _check_config(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    # what docker-compose.yml fixes inside the container; the rest comes from cwd's .env
    clean.update({"OPTSERVE_HOST": "0.0.0.0", "OPTSERVE_PORT": "8000",
                  "OPTSERVE_DATA_DIR": str(cwd / "data"), **env})
    return subprocess.run([sys.executable, "-m", "app", "--check-config"], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=60)


def test_the_config_check_compose_runs_first(tmp_path: Path) -> None:
    assert make_keys(tmp_path).returncode == 0
    ok = _check_config(tmp_path, {})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("optserve: configuration OK: 0.0.0.0:8000") and \
        "2 API key(s)" in ok.stdout
    (tmp_path / ".env").write_text("")  # the container without keys: refused once, exit 2
    refused = _check_config(tmp_path, {})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "refusing to serve on 0.0.0.0 without API keys" in refused.stderr


def test_the_config_check_makes_nothing(tmp_path: Path) -> None:
    """``--check-config`` changes nothing: a data directory that does not exist yet is not made
    (the server makes it when it starts), and one that could not be made is refused."""
    data = tmp_path / "not" / "yet"
    ok = _check_config(tmp_path, {"OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_DATA_DIR": str(data)})
    assert ok.returncode == 0, ok.stderr
    assert f"data in {data}" in ok.stdout
    assert not (tmp_path / "not").exists()
    (tmp_path / "file").write_text("")
    under_a_file = tmp_path / "file" / "data"
    refused = _check_config(tmp_path, {"OPTSERVE_HOST": "127.0.0.1",
                                       "OPTSERVE_DATA_DIR": str(under_a_file)})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cannot make it" in refused.stderr and "is not a directory" in refused.stderr
    # a directory nothing can be made in, whatever its mode says (root's os.access said yes)
    in_proc = _check_config(tmp_path, {"OPTSERVE_HOST": "127.0.0.1",
                                       "OPTSERVE_DATA_DIR": "/proc/optserve-nope/data"})
    assert in_proc.returncode == 2 and "Traceback" not in in_proc.stderr, in_proc.stderr
    assert "cannot make it in /proc" in in_proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]
