"""``optserve``: the command-line tool.

::

    optserve serve [--host H] [--port P] [--device D] [--data-dir DIR] [--log-level L]
    optserve sessions ls
    optserve sessions show ID
    optserve sessions rm ID [ID ...]
    optserve export ID -o FILE [--format torch|safetensors|json]
    optserve import ID FILE [--format torch|safetensors|json]
    optserve history ID [-o FILE] [--since N] [--until N] [--fields F,...] [--points P]
                        [--format csv|json]
    optserve watch ID [--interval S] [--frames N]     (needs plotext: the ``watch`` extra)

Options for the client commands (before or after the subcommand): ``--url`` (env
``OPTSERVE_BASE_URL``, default ``http://127.0.0.1:8000``), ``--api-key`` (env
``OPTSERVE_API_KEY``), ``--timeout``, ``--json`` (machine-readable output) and ``--progress
auto|always|never`` (a bar on stderr for large transfers; ``auto``: only on a terminal).

Exit codes: 0 ok, 1 the server answered with an error (printed as one line, ``error 404
session_not_found: no session 'x'``) or another failure, 2 usage error (bad arguments, an
unreadable input file, a format that cannot be guessed), 3 no connection to the server.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import runpy
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

from . import _api
from ._client import Client
from ._constants import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT,
    JSON,
    OCTET_STREAM,
    STEP_HEADER,
    VERSION_HEADER,
    WATCH_HINT,
)
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    OptserveError,
    make_status_error,
)
from ._progress import ProgressBar, should_show
from ._tensors import tree_to_json
from ._types import SessionInfo
from ._version import __version__

__all__ = ["main", "guess_format", "build_parser"]

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

FORMATS: tuple[_api.StateFormat, ...] = ("torch", "safetensors", "json")
_EXTENSIONS: dict[str, _api.StateFormat] = {
    ".pt": "torch",
    ".pth": "torch",
    ".safetensors": "safetensors",
    ".json": "json",
}
_CHUNK = 1 << 20
_PROG = "optserve"


class UsageError(Exception):
    """Bad arguments found after parsing (exit 2)."""


class CommandError(Exception):
    """A local failure that is not the server's answer (exit 1)."""


# --------------------------------------------------------------------------- helpers
def guess_format(path: str | os.PathLike[str]) -> _api.StateFormat | None:
    """The state-dict format a file name implies: ``.pt``/``.pth`` torch, ``.safetensors``,
    ``.json`` (case-insensitive), else None."""
    return _EXTENSIONS.get(Path(path).suffix.lower())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def format_api_error(exc: APIStatusError) -> str:
    """``error 404 session_not_found: no session 'x'`` (``(field: options.lr)`` when the problem
    names one)."""
    head = f"error {exc.status_code}"
    if exc.code:
        head += f" {exc.code}"
    title = exc.problem.get("title")
    detail = exc.detail
    if not detail:
        detail = title if isinstance(title, str) and title else None
    if not detail:
        detail = exc.response.reason_phrase or "request failed"
        with contextlib.suppress(Exception):
            if exc.response.text.strip():
                detail = exc.response.text.strip()[:300]
    line = f"{head}: {_one_line(detail)}"
    if exc.field:
        line += f" (field: {exc.field})"
    return line


def _format_number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if value is None:
        return "-"
    try:
        return f"{float(value):g}"  # a 0-d tensor option
    except (TypeError, ValueError):
        return str(value)


def _lr_cell(info: SessionInfo) -> str:
    values = info.lr or [g.lr for g in info.param_groups]
    return ",".join(_format_number(v) for v in values) or "-"


def sessions_table(sessions: Sequence[SessionInfo]) -> str:
    """The ``sessions ls`` table: id, optimizer, device, version, step, lr, #params."""
    header = ("ID", "OPTIMIZER", "DEVICE", "VERSION", "STEP", "LR", "#PARAMS")
    right = {3, 4, 6}
    rows = [header] + [
        (s.id, s.optimizer, s.device or "-", str(s.version), str(s.step), _lr_cell(s),
         str(len(s.param_names)))
        for s in sessions
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _print_json(obj: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(obj, indent=2), file=stream or sys.stdout)


# --------------------------------------------------------------------------- streaming I/O
def _send_streaming(
    client: Client,
    method: str,
    path: str,
    *,
    params: Sequence[tuple[str, str]] = (),
    accept: str = JSON,
    content: Callable[[], bytes | Iterator[bytes]] | None = None,
    content_type: str | None = None,
    content_length: int | None = None,
) -> httpx.Response:
    """Send a request and return the open streaming response (2xx only: an error status is read
    and raised as the SDK's typed error). Retried after connection errors as the SDK retries
    idempotent calls (export and import are both idempotent). The caller closes the response."""
    attempt = 0
    first_failure: float | None = None
    while True:
        headers = dict(client.default_headers)
        headers["Accept"] = accept
        if content_type is not None:
            headers["Content-Type"] = content_type
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        request = client._client.build_request(
            method, client.base_url + path, params=tuple(params),
            content=content() if content is not None else None,
            headers=headers, timeout=client.timeout,
        )
        try:
            response = client._client.send(request, stream=True)
        except httpx.TransportError as exc:
            first_failure = time.monotonic() if first_failure is None else first_failure
            if client._may_retry(attempt, first_failure):
                time.sleep(client._retry_delay(attempt))
                attempt += 1
                continue
            raise client._connection_error(request, exc) from None
        if response.is_error:
            try:
                response.read()
            except httpx.TransportError as exc:
                response.close()
                raise client._connection_error(request, exc) from None
            response.close()
            raise make_status_error(response)
        return response


def _file_mode(dest: Path) -> int:
    """The mode the exported file gets: an existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(dest: Path, chunks: Iterator[bytes]) -> int:
    """Write ``chunks`` to a temporary file next to ``dest``, fsync it and rename it over
    ``dest``: readers see the old file or the whole new one, never a partial download. The
    temporary file is removed on any failure (``KeyboardInterrupt`` included). Returns the
    number of bytes written."""
    directory = dest.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=directory)
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return written


def _download_chunks(response: httpx.Response, bar: ProgressBar) -> Iterator[bytes]:
    seen = 0
    for chunk in response.iter_bytes(_CHUNK):
        # Count bytes on the wire so the bar matches Content-Length even if the body is encoded.
        now = response.num_bytes_downloaded
        bar.update(now - seen)
        seen = now
        yield chunk


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _header_int(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- commands
#: the tool's retries: a count, not the SDK's 60 s budget (a command against a server that is
#: down says so in about 1.5 s)
CLI_MAX_RETRIES = 2


def _client(ns: argparse.Namespace) -> Client:
    try:
        return Client(base_url=ns.url, api_key=ns.api_key, timeout=ns.timeout,
                      max_retries=CLI_MAX_RETRIES)
    except ValueError as exc:  # (a base URL without http:// or https://)
        raise UsageError(str(exc).replace("base_url", getattr(ns, "url_source", "--url"),
                                          1)) from None


def cmd_sessions_ls(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        sessions = client.list_sessions()
    if ns.json:
        _print_json({"sessions": [s.raw for s in sessions]})
    else:
        print(sessions_table(sessions))
    return EXIT_OK


def cmd_sessions_show(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        info = client.get_session(ns.id)
    _print_json(info.raw)
    return EXIT_OK


def cmd_sessions_rm(ns: argparse.Namespace) -> int:
    """Deletes every id it can, as rm(1) goes on past a missing file: a refusal of one (a 404,
    a 412, ...) is said and the rest are still deleted (exit 1 then); a server out of reach
    stops it (exit 3)."""
    code = EXIT_OK
    with _client(ns) as client:
        for sid in ns.ids:
            try:
                client.delete_session(sid)
            except APIStatusError as exc:
                print(format_api_error(exc), file=sys.stderr)
                code = EXIT_API_ERROR
                continue
            if ns.json:
                print(json.dumps({"deleted": sid}))
            else:
                print(f"deleted session {sid!r}")
            sys.stdout.flush()
    return code


def cmd_history(ns: argparse.Namespace) -> int:
    fmt = ns.format or ("json" if str(ns.output).lower().endswith(".json") else "csv")
    fields: list[str] | None = ns.fields
    if ns.output != "-":
        _check_output(ns.output)
    with _client(ns) as client:
        if fmt == "csv":
            text = client.history_csv(ns.id, since=ns.since, until=ns.until, fields=fields,
                                      points=ns.points)
        else:
            h = client.history(ns.id, since=ns.since, until=ns.until, fields=fields,
                               points=ns.points)
            # infinities as the server writes them ({"$float": "inf"}): Python's Infinity
            # literal is no JSON
            text = json.dumps(tree_to_json(
                {"id": h.id, "capacity": h.capacity, "first": h.first, "last": h.last,
                 "rows": h.rows, "points": h.points, "fields": h.fields,
                 "columns": h.columns}), allow_nan=False) + "\n"
    if ns.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    dest = Path(ns.output)
    try:
        write_atomically(dest, iter([text.encode()]))  # its temporary file removed on failure
    except OSError as exc:
        raise CommandError(f"cannot write {str(dest)!r}: {exc.strerror or exc}") from None
    rows = max(0, text.count("\n") - 1) if fmt == "csv" else None
    if ns.json:
        print(json.dumps({"id": ns.id, "output": str(dest), "format": fmt, "rows": rows}))
    else:
        what = f"{rows} rows" if rows is not None else "history"
        print(f"wrote {what} of session {ns.id!r} to {dest} ({fmt})", file=sys.stderr)
    return EXIT_OK


def cmd_watch(ns: argparse.Namespace) -> int:
    from ._watch import WatchUnavailable, watch

    try:
        with _client(ns) as client:
            client.get_session(ns.id)  # a 404 before the screen is cleared
            return watch(client, ns.id, interval=ns.interval, frames=ns.frames,
                         color=None if ns.color == "auto" else ns.color == "always")
    except WatchUnavailable as exc:
        raise CommandError(str(exc)) from None


def _export_format(ns: argparse.Namespace) -> _api.StateFormat:
    if ns.format is not None:
        fmt: _api.StateFormat = ns.format
        return fmt
    if ns.output == "-":
        return "safetensors"
    return guess_format(ns.output) or "safetensors"


def _check_output(output: str) -> None:
    """A usage error (exit 2), before anything is asked of the server, for an output path
    that cannot be written: a directory, or a file in a directory that does not exist."""
    dest = Path(output)
    if dest.is_dir():
        raise UsageError(f"{output}: is a directory")
    if not dest.parent.is_dir():
        raise UsageError(f"{output}: directory {str(dest.parent)!r} does not exist")


def cmd_export(ns: argparse.Namespace) -> int:
    fmt = _export_format(ns)
    to_stdout = ns.output == "-"
    dest = Path(ns.output)
    if not to_stdout:
        _check_output(ns.output)
    accept = JSON if fmt == "json" else OCTET_STREAM
    with _client(ns) as client:
        response = _send_streaming(client, "GET", _api._sid(ns.id) + "/state_dict",
                                   params=[("format", fmt)], accept=accept)
        try:
            total = _content_length(response)
            bar = ProgressBar(f"export {ns.id}", total, sys.stderr,
                              enabled=should_show(ns.progress, sys.stderr, total))
            try:
                chunks = _download_chunks(response, bar)
                if to_stdout:
                    out = sys.stdout.buffer
                    size = 0
                    for chunk in chunks:
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                else:
                    try:
                        size = write_atomically(dest, chunks)
                    except OSError as exc:
                        raise CommandError(f"cannot write {ns.output}: {exc.strerror or exc}"
                                           ) from exc
            except BaseException:
                bar.close(success=False)
                raise
            bar.close()
        except httpx.TransportError as exc:
            raise APIConnectionError(request=response.request, reason=str(exc), cause=exc,
                                     message=f"download interrupted: {exc}") from None
        finally:
            response.close()
    version = _header_int(response, VERSION_HEADER)
    step = _header_int(response, STEP_HEADER)
    summary = {"id": ns.id, "format": fmt, "path": "-" if to_stdout else str(dest),
               "bytes": size, "version": version, "step": step}
    if to_stdout:
        return EXIT_OK  # stdout holds the state dict itself
    if ns.json:
        _print_json(summary)
    else:
        print(f"exported session {ns.id!r} (version {version}, step {step}) to {dest} "
              f"[{fmt}, {size} bytes]")
    return EXIT_OK


def _import_format(ns: argparse.Namespace) -> _api.StateFormat:
    if ns.format is not None:
        fmt: _api.StateFormat = ns.format
        return fmt
    if ns.file == "-":
        raise UsageError("reading the state dict from stdin needs --format")
    guessed = guess_format(ns.file)
    if guessed is None:
        raise UsageError(f"cannot guess the format of {ns.file!r} from its extension "
                         "(.pt/.pth, .safetensors, .json); pass --format")
    return guessed


def cmd_import(ns: argparse.Namespace) -> int:
    fmt = _import_format(ns)
    content_type = JSON if fmt == "json" else OCTET_STREAM
    data: bytes | None = None
    path = Path(ns.file)
    if ns.file == "-":
        data = sys.stdin.buffer.read()
        size = len(data)
    else:
        try:
            if path.is_dir():
                raise UsageError(f"{ns.file}: is a directory")
            size = path.stat().st_size
            with open(path, "rb"):
                pass  # readable?
        except OSError as exc:
            raise UsageError(f"cannot read {ns.file}: {exc.strerror or exc}") from exc
    bar = ProgressBar(f"import {ns.id}", size, sys.stderr,
                      enabled=should_show(ns.progress, sys.stderr, size))

    def body() -> bytes | Iterator[bytes]:
        bar.done = 0
        if data is not None:
            bar.update(len(data))
            return data
        return _read_chunks(path, bar)

    try:
        with _client(ns) as client:
            response = _send_streaming(
                client, "PUT", _api._sid(ns.id) + "/state_dict", params=[("format", fmt)],
                content=body, content_type=content_type, content_length=size)
            try:
                response.read()
            except httpx.TransportError as exc:
                raise APIConnectionError(request=response.request, reason=str(exc), cause=exc,
                                         message=f"connection lost: {exc}") from None
            finally:
                response.close()
    except BaseException:
        bar.close(success=False)
        raise
    bar.close()
    try:
        info = _api._parse_session(response)
    except (ValueError, KeyError) as exc:
        raise APIResponseValidationError(f"cannot read the import response: {exc}",
                                         response=response) from exc
    if ns.json:
        _print_json(info.raw)
    else:
        print(f"imported {ns.file} [{fmt}, {size} bytes] into session {info.id!r} "
              f"(version {info.version}, step {info.step})")
    return EXIT_OK


def _read_chunks(path: Path, bar: ProgressBar) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            bar.update(len(chunk))
            yield chunk


def server_installed() -> bool:
    """Whether the optserve server (the ``app`` package with ``python -m app``) is importable."""
    try:
        return (importlib.util.find_spec("app.__main__") is not None
                and importlib.util.find_spec("app.config") is not None)
    except (ImportError, ValueError):
        return False


SERVE_ENV = {
    "host": "OPTSERVE_HOST",
    "port": "OPTSERVE_PORT",
    "device": "OPTSERVE_DEVICE",
    "data_dir": "OPTSERVE_DATA_DIR",
    "log_level": "OPTSERVE_LOG_LEVEL",
}


def serve_environment(ns: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with each given ``serve`` flag set as its ``OPTSERVE_*`` variable."""
    env = dict(environ)
    for attr, var in SERVE_ENV.items():
        value = getattr(ns, attr, None)
        if value is not None:
            env[var] = str(value)
    return env


def cmd_serve(ns: argparse.Namespace) -> int:
    if not server_installed():
        print(f"{_PROG}: error: the optserve server is not installed in this environment (no "
              "importable 'app' package); install the server (pip install . from the "
              "optserve repository) or run its Docker image. This package is only the client.",
              file=sys.stderr)
        return EXIT_API_ERROR
    os.environ.update(serve_environment(ns, {}))
    sys.argv = [sys.argv[0]]
    try:
        runpy.run_module("app", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return EXIT_OK
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return EXIT_API_ERROR
    return EXIT_OK


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def _fields(text: str) -> list[str]:
    """``--fields``: names separated by commas (an empty piece beside a name is only a
    separator, as on the server); naming none is refused, as the server refuses ``?fields=``."""
    names = [name for name in text.split(",") if name]
    if not names:
        raise argparse.ArgumentTypeError(
            f"names no field: {text!r}; leave --fields out for every field, or name some "
            "(--fields lr,grad_norm)")
    return names


def _session_id(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a session id cannot be empty")
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def _client_options(defaults: bool) -> _Parser:
    """The client options, accepted before and after the subcommand. Only the top-level
    parser sets defaults: the subcommands' copies are suppressed unless given."""
    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p = _Parser(add_help=False)
    g = p.add_argument_group("client options")
    g.add_argument("--url", default=d(None), metavar="URL",
                   help=f"server base URL (env {BASE_URL_ENV}; default {DEFAULT_BASE_URL})")
    g.add_argument("--api-key", default=d(None), metavar="KEY",
                   help=f"API key, sent as a bearer token (env {API_KEY_ENV})")
    g.add_argument("--timeout", type=_positive_float, default=d(DEFAULT_TIMEOUT),
                   metavar="SECONDS", help=f"per-request timeout (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable JSON output")
    g.add_argument("--progress", choices=("auto", "always", "never"), default=d("auto"),
                   help="progress bar on stderr for transfers (auto: large ones on a terminal)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG, parents=[_client_options(True)],
        description="optserve: PyTorch's torch.optim as an HTTP service. Manage sessions, "
                    "move their optimizer state in and out, or run the server.",
        epilog="exit codes: 0 ok, 1 API error, 2 usage error, 3 connection error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _client_options(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    serve = sub.add_parser("serve", help="run the server (needs the optserve server package)",
                           description="Run the optserve server (python -m app); each flag "
                                       "sets its OPTSERVE_* variable.")
    serve.add_argument("--host", help="bind address (OPTSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port (OPTSERVE_PORT, default 8000)")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (OPTSERVE_DEVICE)")
    serve.add_argument("--data-dir", help="where sessions persist (OPTSERVE_DATA_DIR)")
    serve.add_argument("--log-level", help="debug | info | warning | ... (OPTSERVE_LOG_LEVEL)")
    serve.set_defaults(func=cmd_serve)

    sessions = sub.add_parser("sessions", help="list, show and delete sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", metavar="SUBCOMMAND",
                                   parser_class=_Parser)
    ssub.required = True
    ls = ssub.add_parser("ls", parents=[common], help="list sessions as a table")
    ls.set_defaults(func=cmd_sessions_ls)
    show = ssub.add_parser("show", parents=[common], help="a session's description (JSON)")
    show.add_argument("id", metavar="ID", type=_session_id)
    show.set_defaults(func=cmd_sessions_show)
    rm = ssub.add_parser("rm", parents=[common], help="delete sessions",
                        description="Delete each session named. One that cannot be deleted "
                        "(no such session, ...) is reported and the others are still deleted; "
                        "the exit code is then 1.")
    rm.add_argument("ids", metavar="ID", nargs="+", type=_session_id)
    rm.set_defaults(func=cmd_sessions_rm)

    export = sub.add_parser(
        "export", parents=[common], help="download a session's optimizer state to a file",
        description="Download a session's state dict. The format defaults to the one the "
                    "output's extension names (.pt/.pth torch, .safetensors, .json), else "
                    "safetensors. The file is written atomically (temp file + rename).")
    export.add_argument("id", metavar="ID", type=_session_id)
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="output file ('-' for stdout)")
    export.add_argument("--format", choices=FORMATS, default=None)
    export.set_defaults(func=cmd_export, usage_parser=export)

    imp = sub.add_parser(
        "import", parents=[common], help="upload optimizer state from a file into a session",
        description="Upload a state dict (a torch.save file, safetensors or JSON, as exported) "
                    "into a session. The format is guessed from the extension (.pt/.pth, "
                    ".safetensors, .json) unless --format is given.")
    imp.add_argument("id", metavar="ID", type=_session_id)
    imp.add_argument("file", metavar="FILE", help="input file ('-' for stdin, needs --format)")
    imp.add_argument("--format", choices=FORMATS, default=None)
    imp.set_defaults(func=cmd_import, usage_parser=imp)

    hist = sub.add_parser(
        "history", parents=[common], help="export a session's per-step metrics (CSV or JSON)",
        description="Download a session's history (GET .../history): one row per step with "
                    "n, step, version, time, lr/grad_norm/update_norm/param_norm/update_ratio "
                    "per group, skipped, nonfinite and the client's scalars.")
    hist.add_argument("id", metavar="ID", type=_session_id)
    hist.add_argument("-o", "--output", default="-", metavar="FILE",
                      help="output file (default '-': stdout); .json implies --format json")
    hist.add_argument("--format", choices=("csv", "json"), default=None)
    hist.add_argument("--since", type=_count, default=None, metavar="N",
                      help="only rows with n > N")
    hist.add_argument("--until", type=_count, default=None, metavar="N",
                      help="only rows with n <= N")
    hist.add_argument("--fields", type=_fields, default=None, metavar="F,...",
                      help="columns or families (lr, grad_norm, scalars, scalars.loss, ...)")
    hist.add_argument("--points", type=_count, default=None, metavar="P",
                      help="downsample to P buckets (min and max of each column)")
    hist.set_defaults(func=cmd_history, usage_parser=hist)

    watch = sub.add_parser(
        "watch", parents=[common], help="live terminal plots of a session's metrics",
        description="Draw a session's lr, gradient and update norms, update/parameter ratio, "
                    "client scalars, skipped steps and steps per second in the terminal, "
                    "refreshed every --interval seconds (Ctrl-C quits). Needs plotext: "
                    f"{WATCH_HINT}.")
    watch.add_argument("id", metavar="ID", type=_session_id)
    watch.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS")
    watch.add_argument("--frames", type=_count, default=0, metavar="N",
                       help="stop after N frames (default 0: until Ctrl-C)")
    watch.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    watch.set_defaults(func=cmd_watch, usage_parser=watch)
    return parser


def _resolve(ns: argparse.Namespace) -> None:
    """Fill the client options from the environment where not given."""
    given = getattr(ns, "url", None)
    url = given or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    ns.url = url.rstrip("/")
    #: what a bad base URL's usage error names: the option, or the variable it came from
    ns.url_source = "--url" if given or not os.environ.get(BASE_URL_ENV) else BASE_URL_ENV
    key = getattr(ns, "api_key", None)
    ns.api_key = key if key is not None else (os.environ.get(API_KEY_ENV) or None)


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    _resolve(ns)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except UsageError as exc:
        usage_parser: argparse.ArgumentParser = getattr(ns, "usage_parser", parser)
        usage_parser.print_usage(sys.stderr)
        print(f"{usage_parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except APIStatusError as exc:
        print(format_api_error(exc), file=sys.stderr)
        return EXIT_API_ERROR
    except APITimeoutError as exc:
        print(f"error: timed out talking to {ns.url}: {_one_line(exc.reason or exc.message)}",
              file=sys.stderr)
        return EXIT_CONNECTION
    except APIConnectionError as exc:
        print(f"error: cannot connect to {ns.url}: {_one_line(exc.reason or exc.message)}",
              file=sys.stderr)
        return EXIT_CONNECTION
    except (APIResponseValidationError, OptserveError) as exc:
        print(f"error: {_one_line(exc.message)}", file=sys.stderr)
        return EXIT_API_ERROR
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except BrokenPipeError:
        # The reader went away (``optserve sessions ls | head``): not an error.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
