"""The command-line tool without a server: progress-bar rendering, format guessing, the sessions
table, error lines, argument parsing, the atomic writer and ``serve``'s environment mapping."""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from optserve import SessionInfo, _progress, cli
from optserve._exceptions import make_status_error
from optserve._progress import ProgressBar, format_bytes, format_duration, render, should_show


# ----------------------------------------------------------------------------- format guessing
@pytest.mark.parametrize("name, fmt", [
    ("opt.pt", "torch"),
    ("opt.pth", "torch"),
    ("dir.d/OPT.PT", "torch"),
    ("opt.safetensors", "safetensors"),
    ("a/b/opt.SafeTensors", "safetensors"),
    ("opt.json", "json"),
    ("opt.pt.json", "json"),
    ("opt.bin", None),
    ("opt", None),
    (".pt", None),  # a dotfile named ".pt" has no extension
    ("opt.pt.bak", None),
])
def test_guess_format(name: str, fmt: str | None) -> None:
    assert cli.guess_format(name) == fmt
    assert cli.guess_format(Path(name)) == fmt


# ----------------------------------------------------------------------------- progress bar
@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (10 * 2**20, "10.0 MiB"), (3 * 2**30 + 2**29, "3.5 GiB"), (2**50, "1024.0 TiB"), (-5, "0 B"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("s, text", [
    (0, "0:00"), (0.4, "0:00"), (0.6, "0:01"), (59, "0:59"), (75, "1:15"), (3600, "1:00:00"),
    (3725, "1:02:05"), (-3, "0:00"),
])
def test_format_duration(s: float, text: str) -> None:
    assert format_duration(s) == text


def test_render_known_total() -> None:
    line = render("export s", 5 * 2**20, 10 * 2**20, 2.0, width=100)
    assert line == ("export s  50% [####################--------------------] "
                    "5.0 MiB/10.0 MiB 2.5 MiB/s ETA 0:02")


def test_render_bar_fills_proportionally_and_clamps() -> None:
    def bar(done: int, total: int) -> str:
        line = render("x", done, total, 1.0, width=100)
        return line[line.index("[") + 1:line.index("]")]
    assert bar(0, 100) == "-" * 40
    assert bar(25, 100) == "#" * 10 + "-" * 30
    assert bar(99, 100) == "#" * 39 + "-"
    assert bar(100, 100) == "#" * 40
    assert bar(150, 100) == "#" * 40  # more than announced: clamped to 100%
    assert "100%" in render("x", 150, 100, 1.0, width=100)


def test_render_finished_shows_total_time() -> None:
    assert render("import s", 2048, 2048, 4.0, width=100) == (
        "import s 100% [########################################] 2.0 KiB 512 B/s in 0:04")


def test_render_unknown_rate_and_unknown_total() -> None:
    assert render("x", 0, 1000, 0.0, width=80).endswith("0 B/1000 B 0 B/s ETA --:--")
    assert render("dl", 3 * 2**20, None, 2.0) == "dl 3.0 MiB 1.5 MiB/s"
    assert render("dl", 100, 0, 1.0) == "dl 100 B 100 B/s"


@pytest.mark.parametrize("width", [20, 30, 45, 60, 80, 120, 200])
def test_render_fits_the_width(width: int) -> None:
    line = render("export some-session", 123_456, 9_876_543, 1.5, width=width)
    assert len(line) <= width
    if width >= 80:
        assert "[" in line and "]" in line
        assert line.index("]") - line.index("[") - 1 <= 40


def test_render_drops_the_bar_when_narrow() -> None:
    line = render("export s", 1, 2, 1.0, width=40)
    assert "[" not in line and line.startswith("export s  50% ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_throttles_and_ends_the_line() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar("x", 1000, stream, clock=clock, interval=0.5, width=60)
    bar.update(100)  # first update draws
    assert stream.getvalue().count("\r") == 1 and " 10%" in stream.getvalue()
    clock.now += 0.1
    bar.update(100)  # too soon: no draw
    assert stream.getvalue().count("\r") == 1
    clock.now += 0.5
    bar.update(100)
    assert stream.getvalue().count("\r") == 2 and " 30%" in stream.getvalue()
    bar.update(700)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    last = text.rsplit("\r", 1)[1]
    assert "100%" in last and "in 0:01" in last and len(last) == 61  # padded to the width
    bar.close()  # idempotent
    bar.update(1)  # after close: nothing drawn
    assert stream.getvalue() == text


def test_progress_bar_disabled_writes_nothing_but_counts() -> None:
    stream = io.StringIO()
    with ProgressBar("x", 10, stream, enabled=False) as bar:
        bar.update(4)
        bar.update(6)
    assert bar.done == 10 and stream.getvalue() == ""


def test_progress_bar_failure_ends_a_started_line_without_a_final_draw() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with pytest.raises(RuntimeError), ProgressBar("x", 10, stream, clock=clock, width=40) as bar:
        bar.update(3)
        raise RuntimeError
    assert stream.getvalue().count("\r") == 1 and stream.getvalue().endswith("\n")
    assert "100%" not in stream.getvalue()
    silent = io.StringIO()
    ProgressBar("x", 10, silent, width=40).close(success=False)  # never drawn: no newline
    assert silent.getvalue() == ""


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("mode, tty, total, shown", [
    ("always", False, 10, True),
    ("never", True, 10**9, False),
    ("auto", False, 10**9, False),
    ("auto", True, 10**9, True),
    ("auto", True, None, True),
    ("auto", True, _progress.DEFAULT_THRESHOLD, True),
    ("auto", True, _progress.DEFAULT_THRESHOLD - 1, False),
])
def test_should_show(mode: str, tty: bool, total: int | None, shown: bool) -> None:
    assert should_show(mode, Stream(tty), total) is shown


def test_should_show_closed_stream() -> None:
    s = io.StringIO()
    s.close()  # isatty() raises ValueError
    assert should_show("auto", s, None) is False


# ----------------------------------------------------------------------------- output
def session(sid: str, optimizer: str, lrs: list[Any], names: list[list[str]],
            **extra: Any) -> SessionInfo:
    return SessionInfo.from_json({
        "id": sid, "optimizer": optimizer, "device": "cpu", "version": 12, "step": 7,
        "defaults": {"lr": lrs[0]}, "scheduler": None, "lr": lrs,
        "param_groups": [{"params": n, "lr": lr} for n, lr in zip(names, lrs, strict=True)],
        **extra})


def test_sessions_table() -> None:
    table = cli.sessions_table([
        session("a", "Adam", [0.001], [["w", "b"]]),
        session("long-session-id", "SGD", [0.1, 2.5e-05], [["x"], ["y", "z"]]),
    ])
    assert table.splitlines() == [
        "ID               OPTIMIZER  DEVICE  VERSION  STEP  LR           #PARAMS",
        "a                Adam       cpu          12     7  0.001              2",
        "long-session-id  SGD        cpu          12     7  0.1,2.5e-05        3",
    ]
    assert cli.sessions_table([]) == "ID  OPTIMIZER  DEVICE  VERSION  STEP  LR  #PARAMS"


def problem_response(status: int, body: Any, content_type: str = "application/problem+json"
                     ) -> httpx.Response:
    request = httpx.Request("GET", "http://test/v1/sessions/x")
    if isinstance(body, bytes):
        return httpx.Response(status, content=body, headers={"Content-Type": content_type},
                              request=request)
    return httpx.Response(status, json=body, request=request)


@pytest.mark.parametrize("status, body, line", [
    (404, {"type": "urn:optserve:problem:session_not_found", "title": "Not Found",
           "status": 404, "code": "session_not_found", "detail": "no session 'x'",
           "field": "session_id"},
     "error 404 session_not_found: no session 'x' (field: session_id)"),
    (422, {"code": "invalid_option", "detail": "lr must be\n  positive", "field": "options.lr"},
     "error 422 invalid_option: lr must be positive (field: options.lr)"),
    (409, {"code": "conflict", "title": "Conflict"}, "error 409 conflict: Conflict"),
    (502, b"<html>bad gateway</html>", "error 502: <html>bad gateway</html>"),
    (503, b"", "error 503: Service Unavailable"),
])
def test_format_api_error(status: int, body: Any, line: str) -> None:
    assert cli.format_api_error(make_status_error(problem_response(status, body))) == line


# ----------------------------------------------------------------------------- parsing
def parse(*argv: str) -> argparse.Namespace:
    ns = cli.build_parser().parse_args(list(argv))
    cli._resolve(ns)
    return ns


def test_client_options_before_or_after_the_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTSERVE_BASE_URL", raising=False)
    monkeypatch.delenv("OPTSERVE_API_KEY", raising=False)
    ns = parse("sessions", "ls")
    assert (ns.url, ns.api_key, ns.json, ns.progress, ns.timeout) == (
        "http://127.0.0.1:8000", None, False, "auto", 60.0)
    before = parse("--url", "http://h:1/", "--api-key", "k", "--json", "--timeout", "5",
                   "sessions", "ls")
    after = parse("sessions", "ls", "--url", "http://h:1/", "--api-key", "k", "--json",
                  "--timeout", "5")
    for ns in (before, after):
        assert (ns.url, ns.api_key, ns.json, ns.timeout) == ("http://h:1", "k", True, 5.0)
    # given after the subcommand wins over before it
    assert parse("--url", "http://a", "export", "x", "-o", "f", "--url", "http://b").url == \
        "http://b"


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_BASE_URL", "http://env:9")
    monkeypatch.setenv("OPTSERVE_API_KEY", "envkey")
    ns = parse("sessions", "ls")
    assert (ns.url, ns.api_key) == ("http://env:9", "envkey")
    ns = parse("sessions", "ls", "--url", "http://flag", "--api-key", "flagkey")
    assert (ns.url, ns.api_key) == ("http://flag", "flagkey")
    monkeypatch.setenv("OPTSERVE_BASE_URL", "")
    assert parse("sessions", "ls").url == "http://127.0.0.1:8000"


@pytest.mark.parametrize("argv", [
    [], ["sessions"], ["bogus"], ["sessions", "show"], ["sessions", "show", ""],
    ["export", "x"], ["export", "x", "-o", "f", "--format", "pickle"], ["import", "x"],
    ["sessions", "ls", "--timeout", "0"], ["sessions", "ls", "--progress", "sometimes"],
    ["serve", "--port", "70000"],
])
def test_parse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: optserve" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["import", "x", "state.bin"], "cannot guess the format of 'state.bin'"),
    (["import", "x", "-"], "needs --format"),
    (["import", "x", "{tmp}", "--format", "json"], "is a directory"),
    (["import", "x", "{tmp}/missing.pt"], "No such file or directory"),
    (["export", "x", "-o", "{tmp}"], "is a directory"),
    (["export", "x", "-o", "{tmp}/no/dir/f.pt"], "does not exist"),
])
def test_usage_errors_found_before_any_request(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["--url", "http://127.0.0.1:9", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and f"usage: optserve {argv[0]}" in captured.err
    assert captured.out == ""


def test_export_format_defaults() -> None:
    def fmt(*argv: str) -> str:
        return cli._export_format(parse("export", "x", *argv))
    assert fmt("-o", "a.pt") == "torch"
    assert fmt("-o", "a.json") == "json"
    assert fmt("-o", "a.bin") == "safetensors"
    assert fmt("-o", "-") == "safetensors"
    assert fmt("-o", "a.json", "--format", "torch") == "torch"


# ----------------------------------------------------------------------------- atomic write
def test_write_atomically_replaces_and_keeps_the_mode(tmp_path: Path) -> None:
    dest = tmp_path / "f.pt"
    assert cli.write_atomically(dest, iter([b"ab", b"", b"cd"])) == 4
    assert dest.read_bytes() == b"abcd"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    dest.chmod(0o640)
    cli.write_atomically(dest, iter([b"new"]))
    assert dest.read_bytes() == b"new" and stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["f.pt"]


@pytest.mark.parametrize("exc", [httpx.ReadError("gone"), KeyboardInterrupt()])
def test_write_atomically_failure_keeps_the_old_file(tmp_path: Path,
                                                     exc: BaseException) -> None:
    dest = tmp_path / "f.pt"
    dest.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise exc

    with pytest.raises(type(exc)):
        cli.write_atomically(dest, chunks())
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.pt"]


# ----------------------------------------------------------------------------- serve
def test_serve_environment_maps_given_flags_only() -> None:
    ns = parse("serve", "--host", "0.0.0.0", "--port", "9000", "--device", "cuda:1",
               "--data-dir", "/var/lib/optserve")
    env = cli.serve_environment(ns, {"OPTSERVE_HOST": "old", "OPTSERVE_LOG_LEVEL": "debug",
                                     "PATH": "/bin"})
    assert env == {"OPTSERVE_HOST": "0.0.0.0", "OPTSERVE_PORT": "9000",
                   "OPTSERVE_DEVICE": "cuda:1", "OPTSERVE_DATA_DIR": "/var/lib/optserve",
                   "OPTSERVE_LOG_LEVEL": "debug", "PATH": "/bin"}
    assert cli.serve_environment(parse("serve"), {}) == {}


def test_serve_without_the_server_installed(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "server_installed", lambda: False)
    called: list[str] = []
    monkeypatch.setattr(cli.runpy, "run_module", lambda *a, **k: called.append("ran"))
    assert cli.main(["serve", "--port", "9000"]) == 1
    err = capsys.readouterr().err
    assert "the optserve server is not installed" in err and len(err.splitlines()) == 1
    assert called == []


@pytest.mark.parametrize("exit_code, rc", [(None, 0), (0, 0), (2, 2), ("boom", 1)])
def test_serve_runs_python_m_app_with_the_flags(monkeypatch: pytest.MonkeyPatch,
                                                exit_code: Any, rc: int) -> None:
    monkeypatch.setattr(cli, "server_installed", lambda: True)
    monkeypatch.setattr(sys, "argv", ["optserve", "serve", "--port", "9123"])
    for var in cli.SERVE_ENV.values():
        monkeypatch.setenv(var, "")  # so that monkeypatch restores what cmd_serve sets
        monkeypatch.delenv(var)
    seen: dict[str, Any] = {}

    def run_module(name: str, run_name: str, alter_sys: bool) -> None:
        seen.update(name=name, run_name=run_name, port=os.environ.get("OPTSERVE_PORT"),
                    device=os.environ.get("OPTSERVE_DEVICE"), argv=list(sys.argv))
        raise SystemExit(exit_code)

    monkeypatch.setattr(cli.runpy, "run_module", run_module)
    assert cli.main(["serve", "--port", "9123"]) == rc
    assert seen == {"name": "app", "run_name": "__main__", "port": "9123", "device": None,
                    "argv": ["optserve"]}


def test_server_installed_here() -> None:
    assert cli.server_installed() is True  # this repository's app package is importable
