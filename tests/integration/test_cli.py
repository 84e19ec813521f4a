"""The ``optserve`` command-line tool, run as a real subprocess against a live server: sessions
ls/show/rm, export in every format (files that load and equal the server's state), import in
every format (the session then continues exactly as the one exported from), error lines and
exit codes, and ``serve`` (flags mapped to ``OPTSERVE_*``, API keys, SIGTERM exits 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

import optserve
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    from_wire,
    grad_stream,
    make_params,
    state_from_safetensors,
    torch_state_dict,
)

pytestmark = pytest.mark.integration

SHAPES = {"w1": [4, 3], "b1": [4], "w2": [2, 4]}
FORMATS = ("torch", "safetensors", "json")
EXT = {"torch": ".pt", "safetensors": ".safetensors", "json": ".json"}
SCHEDULER = {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}}


# ----------------------------------------------------------------------------- helpers
def cli(*args: str, url: str | None = None, env: dict[str, str] | None = None,
        stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """``python -m optserve.cli ARGS`` (with ``--url`` first when given)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OPTSERVE_BASE_URL", "OPTSERVE_API_KEY")}
    full_env.update(env or {})
    argv = [sys.executable, "-m", "optserve.cli"]
    if url is not None:
        argv += ["--url", url]
    return subprocess.run(argv + list(args), input=stdin, capture_output=True, env=full_env,
                          timeout=timeout, check=False)


def out(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode()


def err(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stderr.decode()


def ok(p: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {out(p)}\nstderr: {err(p)}"
    return p


@pytest.fixture
def client(live_server: str) -> Any:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def new_id(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_session(client: optserve.Client, params: dict[str, torch.Tensor] | None = None,
                 steps: int = 2, seed: int = 31) -> str:
    """Adam over two groups (w1, b1 | w2 with amsgrad) with a StepLR, stepped ``steps``
    times so every parameter has state."""
    params = params if params is not None else make_params(SHAPES, seed=seed)
    sid = new_id()
    client.create_session(
        "Adam",
        param_groups=[{"params": {n: params[n] for n in ("w1", "b1")}},
                      {"params": {"w2": params["w2"]}, "lr": 0.002, "amsgrad": True}],
        options={"lr": 0.01}, scheduler=SCHEDULER, id=sid)
    stream = grad_stream(SHAPES, seed=seed + 1)
    for _ in range(steps):
        client.step(sid, next(stream), return_params=False)
    return sid


def load_export(path: Path, fmt: str) -> dict[str, Any]:
    """An exported file read without the SDK: torch.load (weights only), safetensors, JSON."""
    if fmt == "torch":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(sd, dict)
        return sd
    if fmt == "safetensors":
        tensors = load_file(str(path))  # a valid safetensors file...
        assert tensors and all(k.startswith("state.") for k in tensors)
        return state_from_safetensors(path.read_bytes())  # ...holding optserve's state format
    return torch_state_dict(from_wire(json.loads(path.read_text())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------------------- sessions
def test_sessions_ls_shows_a_session_as_a_table_row(live_server: str,
                                                    client: optserve.Client) -> None:
    sid = make_session(client)
    p = ok(cli("sessions", "ls", url=live_server))
    lines = out(p).splitlines()
    assert lines[0].split() == ["ID", "OPTIMIZER", "DEVICE", "VERSION", "STEP", "LR", "#PARAMS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    # lr after two steps of StepLR(step_size=2, gamma=0.5): halved in both groups
    assert rows[sid] == [sid, "Adam", "cpu", "2", "2", "0.005,0.001", "3"]
    assert err(p) == ""


def test_sessions_ls_json_and_base_url_from_the_environment(live_server: str,
                                                           client: optserve.Client) -> None:
    sid = make_session(client)
    p = ok(cli("sessions", "ls", "--json", env={"OPTSERVE_BASE_URL": live_server}))
    listed = {s["id"]: s for s in json.loads(out(p))["sessions"]}
    assert listed[sid] == client.get_session(sid).raw


@pytest.mark.parametrize("json_first", [False, True])
def test_sessions_show_prints_the_description(live_server: str, client: optserve.Client,
                                              json_first: bool) -> None:
    sid = make_session(client)
    args = ["--json", "sessions", "show", sid] if json_first else ["sessions", "show", sid]
    p = ok(cli(*args, url=live_server))
    shown = json.loads(out(p))
    assert shown == client.get_session(sid).raw
    assert shown["id"] == sid and shown["optimizer"] == "Adam" and shown["step"] == 2
    assert out(p).startswith("{\n  ")  # pretty-printed


def test_sessions_rm_deletes(live_server: str, client: optserve.Client) -> None:
    a, b = make_session(client, steps=0), make_session(client, steps=0)
    p = ok(cli("sessions", "rm", a, b, url=live_server))
    assert out(p).splitlines() == [f"deleted session {a!r}", f"deleted session {b!r}"]
    for sid in (a, b):
        with pytest.raises(optserve.NotFoundError):
            client.get_session(sid)
    assert a not in out(ok(cli("sessions", "ls", url=live_server)))



def test_sessions_rm_goes_on_past_a_missing_session(live_server: str,
                                                    client: optserve.Client) -> None:
    """``rm gone a b`` deletes a and b (as rm(1) goes on past a missing file), says what it
    could not delete, and exits 1."""
    a, b = make_session(client, steps=0), make_session(client, steps=0)
    gone = new_id("gone")
    p = cli("sessions", "rm", gone, a, b, url=live_server)
    assert p.returncode == 1, err(p)
    assert out(p).splitlines() == [f"deleted session {a!r}", f"deleted session {b!r}"]
    assert "404 session_not_found" in err(p) and gone in err(p)
    for sid in (a, b):
        with pytest.raises(optserve.NotFoundError):
            client.get_session(sid)


def test_python_dash_m_optserve_is_the_command_line(live_server: str,
                                                    client: optserve.Client) -> None:
    """``python -m optserve`` runs the same tool as the ``optserve`` script and ``-m
    optserve.cli`` (the README's way without the script on ``PATH``)."""
    sid = make_session(client, steps=0)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPTSERVE_BASE_URL", "OPTSERVE_API_KEY")}
    p = subprocess.run([sys.executable, "-m", "optserve", "--url", live_server, "sessions",
                        "show", sid], capture_output=True, env=env, timeout=120, check=False)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["id"] == sid
    usage = subprocess.run([sys.executable, "-m", "optserve", "--help"], capture_output=True,
                           env=env, timeout=120, check=False)
    assert usage.returncode == 0 and usage.stdout.decode().startswith("usage: optserve ")

# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_a_file_equal_to_the_servers_state(
    live_server: str, client: optserve.Client, tmp_path: Path, fmt: str
) -> None:
    sid = make_session(client)
    dest = tmp_path / f"opt{EXT[fmt]}"
    p = ok(cli("export", sid, "-o", str(dest), url=live_server))  # format from the extension
    assert f"to {dest}" in out(p) and f"[{fmt}, {dest.stat().st_size} bytes]" in out(p)
    got = load_export(dest, fmt)
    want = client.export_state(sid, format="safetensors")
    assert_trees_equal(got["state"], want["state"])
    assert_trees_equal(got["param_groups"], want["param_groups"])
    assert got["param_groups"][0]["param_names"] == ["w1", "b1"]
    assert "scheduler" in got and got["scheduler"]["last_epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == [dest.name]  # no temporary file left behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_format_flag_beats_the_extension_and_json_summary(
    live_server: str, client: optserve.Client, tmp_path: Path, fmt: str
) -> None:
    sid = make_session(client)
    dest = tmp_path / "state.bin"
    dest.write_bytes(b"old contents")  # replaced atomically
    p = ok(cli("export", sid, "-o", str(dest), "--format", fmt, "--json", url=live_server))
    summary = json.loads(out(p))
    assert summary == {"id": sid, "format": fmt, "path": str(dest),
                       "bytes": dest.stat().st_size, "version": 2, "step": 2}
    assert_trees_equal(load_export(dest, fmt)["state"],
                       client.export_state(sid, format="torch")["state"])


def test_export_to_stdout(live_server: str, client: optserve.Client, tmp_path: Path) -> None:
    sid = make_session(client)
    p = ok(cli("export", sid, "-o", "-", "--format", "torch", url=live_server))
    (tmp_path / "x.pt").write_bytes(p.stdout)
    assert_trees_equal(load_export(tmp_path / "x.pt", "torch")["state"],
                       client.export_state(sid)["state"])
    assert err(p) == ""


def test_export_progress_bar(live_server: str, client: optserve.Client, tmp_path: Path) -> None:
    sid = make_session(client)
    # auto: stderr is a pipe here, so no bar
    assert err(ok(cli("export", sid, "-o", str(tmp_path / "a.pt"), url=live_server))) == ""
    p = ok(cli("export", sid, "-o", str(tmp_path / "b.pt"), "--progress", "always",
               url=live_server))
    size = (tmp_path / "b.pt").stat().st_size
    assert f"export {sid} 100% [" in err(p) and "#]" in err(p)
    assert err(p).endswith("\n") and "\r" in err(p)
    assert f"{size} B" in err(p) or "KiB" in err(p)


# ----------------------------------------------------------------------------- import
def continue_both(client: optserve.Client, a: str, b: str, steps: int = 3) -> None:
    """Step both sessions with the same gradients; their params, lrs and states stay equal."""
    stream = grad_stream(SHAPES, seed=99)
    for _ in range(steps):
        grads = next(stream)
        ra, rb = client.step(a, grads), client.step(b, grads)
        assert ra.params is not None and rb.params is not None
        assert_tensors_equal(rb.params, ra.params, "params after step")
        assert rb.lr == ra.lr
    assert_trees_equal(client.export_state(b)["state"], client.export_state(a)["state"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_makes_a_session_continue_identically(
    live_server: str, client: optserve.Client, tmp_path: Path, fmt: str
) -> None:
    a = make_session(client, steps=3)
    path = tmp_path / f"a{EXT[fmt]}"
    ok(cli("export", a, "-o", str(path), url=live_server))
    # same shapes and current values, fresh optimizer state
    b = make_session(client, params=dict(client.get_params(a).params), steps=0)
    p = ok(cli("import", b, str(path), url=live_server))  # format from the extension
    assert out(p).startswith(f"imported {path} [{fmt}, {path.stat().st_size} bytes] "
                             f"into session {b!r}")
    continue_both(client, a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_with_format_flag_from_stdin(live_server: str, client: optserve.Client,
                                            tmp_path: Path, fmt: str) -> None:
    a = make_session(client, steps=2)
    body = ok(cli("export", a, "-o", "-", "--format", fmt, url=live_server)).stdout
    b = make_session(client, params=dict(client.get_params(a).params), steps=0)
    p = ok(cli("import", b, "-", "--format", fmt, "--json", url=live_server, stdin=body))
    assert json.loads(out(p)) == client.get_session(b).raw
    continue_both(client, a, b, steps=2)


def test_import_a_local_torch_optimizers_state_dict(live_server: str, client: optserve.Client,
                                                    tmp_path: Path) -> None:
    """A state dict saved by a local ``torch.optim.Adam`` (``.pth``) imports into a session,
    which then steps exactly as the local optimizer does."""
    params = make_params({"w": [3, 5]}, seed=5)
    local = torch.nn.Parameter(params["w"].clone())
    opt = torch.optim.Adam([local], lr=0.05)
    stream = grad_stream({"w": [3, 5]}, seed=6)
    for _ in range(2):
        local.grad = next(stream)["w"]
        opt.step()
    path = tmp_path / "local.pth"
    torch.save(opt.state_dict(), path)
    sid = new_id()
    client.create_session("Adam", {"w": local.detach().clone()}, options={"lr": 0.05}, id=sid)
    ok(cli("import", sid, str(path), url=live_server))
    for _ in range(2):
        g = next(stream)["w"]
        local.grad = g.clone()
        opt.step()
        remote = client.step(sid, {"w": g}).params
        assert remote is not None
        assert_tensors_equal({"w": remote["w"]}, {"w": local.detach()})


def test_import_progress_bar(live_server: str, client: optserve.Client, tmp_path: Path) -> None:
    a = make_session(client)
    path = tmp_path / "a.safetensors"
    ok(cli("export", a, "-o", str(path), url=live_server))
    p = ok(cli("import", a, str(path), "--progress", "always", url=live_server))
    assert f"import {a} 100% [" in err(p)
    assert err(ok(cli("import", a, str(path), url=live_server))) == ""


# ----------------------------------------------------------------------------- errors
def one_line(p: subprocess.CompletedProcess[bytes]) -> str:
    lines = err(p).splitlines()
    assert len(lines) == 1, err(p)
    return lines[0]


@pytest.mark.parametrize("args", [
    ["sessions", "show", "no-such-session"],
    ["sessions", "rm", "no-such-session"],
    ["import", "no-such-session", "{file}"],
])
def test_unknown_session_is_one_error_line_and_exit_1(live_server: str, client: optserve.Client,
                                                     tmp_path: Path, args: list[str]) -> None:
    a = make_session(client, steps=1)
    f = tmp_path / "s.json"
    ok(cli("export", a, "-o", str(f), url=live_server))
    p = cli(*[x.replace("{file}", str(f)) for x in args], url=live_server)
    assert p.returncode == 1
    assert one_line(p) == ("error 404 session_not_found: no session 'no-such-session' "
                           "(field: session_id)")
    assert out(p) == ""


def test_export_of_unknown_session_writes_nothing(live_server: str, tmp_path: Path) -> None:
    p = cli("export", "no-such-session", "-o", str(tmp_path / "x.pt"), url=live_server)
    assert p.returncode == 1
    assert one_line(p).startswith("error 404 session_not_found: no session 'no-such-session'")
    assert os.listdir(tmp_path) == []


def test_import_of_a_mismatched_state_names_the_field(live_server: str, client: optserve.Client,
                                                      tmp_path: Path) -> None:
    a = make_session(client)  # two groups
    path = tmp_path / "a.pt"
    ok(cli("export", a, "-o", str(path), url=live_server))
    b = new_id()
    client.create_session("Adam", {"w": torch.zeros(3)}, id=b)  # one group
    before = client.export_state(b)
    p = cli("import", b, str(path), url=live_server)
    assert p.returncode == 1
    line = one_line(p)
    assert line.startswith("error 422 ") and line.endswith(")") and "(field: state_dict" in line
    assert_trees_equal(client.export_state(b)["state"], before["state"])


def test_server_down_is_exit_3(tmp_path: Path, refusing_url: str) -> None:
    url = refusing_url
    for args in (["sessions", "ls"], ["sessions", "show", "x"],
                 ["export", "x", "-o", str(tmp_path / "x.pt")]):
        p = cli(*args, url=url)
        assert p.returncode == 3, err(p)
        assert one_line(p).startswith(f"error: cannot connect to {url}: ")
    (tmp_path / "y.json").write_text("{}")
    p = cli("import", "x", str(tmp_path / "y.json"), url=url)
    assert p.returncode == 3 and "cannot connect" in one_line(p)
    assert sorted(os.listdir(tmp_path)) == ["y.json"]


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: COMMAND"),
    (["sessions"], "the following arguments are required: SUBCOMMAND"),
    (["sessions", "show"], "the following arguments are required: ID"),
    (["export", "x"], "the following arguments are required: -o/--output"),
    (["export", "x", "-o", "a.pt", "--format", "pickle"], "invalid choice: 'pickle'"),
    (["import", "x", "state.bin"], "cannot guess the format of 'state.bin'"),
    (["import", "x", "-"], "reading the state dict from stdin needs --format"),
    (["import", "x", "/no/such/file.pt"], "cannot read /no/such/file.pt"),
    (["export", "x", "-o", "/no/such/dir/x.pt"], "does not exist"),
    (["sessions", "ls", "--timeout", "-1"], "must be positive"),
    (["serve", "--port", "http"], "not a port number"),
])
def test_usage_errors_exit_2(live_server: str, args: list[str], message: str) -> None:
    p = cli(*args, url=live_server)
    assert p.returncode == 2, err(p)
    assert message in err(p) and "usage: optserve" in err(p)


def test_version_and_help() -> None:
    p = ok(cli("--version"))
    assert out(p).strip() == f"optserve {optserve.__version__}"
    assert "exit codes: 0 ok, 1 API error, 2 usage error, 3 connection error" in out(
        ok(cli("--help")))


# ----------------------------------------------------------------------------- serve
def wait_served(proc: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    """True once ``url`` answers /healthz; False when the server exited because its port was
    taken (between picking and binding it); fails on any other exit or after 90 s."""
    deadline = time.monotonic() + 90
    with httpx.Client(timeout=1) as poll:  # one client: no new TLS context per try
        while True:
            if proc.poll() is not None:
                assert "address already in use" in log.read_text(), log.read_text()
                return False
            try:
                if poll.get(url + "/healthz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)


def test_serve_maps_flags_and_sigterm_exits_0(tmp_path: Path) -> None:
    """``optserve serve`` runs ``python -m app`` with --port/--data-dir/--device as
    OPTSERVE_*; with OPTSERVE_API_KEYS set, --api-key and OPTSERVE_API_KEY authenticate."""
    key = "k" * 24
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env["OPTSERVE_API_KEYS"] = f"{key}:team"
    log = tmp_path / "server.log"
    for attempt in range(4):  # a fresh port when another process took the picked one
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "optserve.cli", "serve", "--port", str(port), "--host",
                 "127.0.0.1", "--data-dir", str(data), "--device", "cpu", "--log-level",
                 "warning"], env=env, stdout=subprocess.DEVNULL, stderr=log_file)
        if wait_served(proc, url, log) or attempt == 3:
            break
    try:
        assert proc.poll() is None, log.read_text()
        p = cli("sessions", "ls", url=url)
        assert p.returncode == 1 and one_line(p).startswith("error 401 ")
        with optserve.Client(url, api_key=key) as c:
            c.create_session("SGD", {"w": torch.ones(2)}, options={"lr": 0.1}, id="served")
        rows = out(ok(cli("sessions", "ls", "--api-key", key, url=url))).splitlines()[1:]
        assert [r.split() for r in rows] == [["served", "SGD", "cpu", "0", "0", "0.1", "1"]]
        shown = json.loads(out(ok(cli("sessions", "show", "served", url=url,
                                      env={"OPTSERVE_API_KEY": key}))))
        assert shown["device"] == "cpu"
        assert any(data.rglob("*")), "nothing persisted under --data-dir"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()
