"""The access log's line, written without a log record where it would only reach the server's
own JSON handler (``app.observability.json_handler``), is the line that handler writes for the
record ``logging`` makes: same keys in the same order, same values, same terminator. Any other
set-up (a second handler, a filter, the text format) goes through ``logging`` as before."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from app import observability
from app.observability import (
    JsonFormatter,
    _access,
    _access_record,
    access_log,
    configure_logging,
    json_handler,
    request_id_var,
)

SIZES = {"in": 4_200, "out": 4_312}
REQUESTS = [("POST", "/v1/sessions/s/step", 200, 0.0012345678),
            ("GET", "/v1/sessions/caf\u00e9/params", 404, 0.000049999),
            ("HEAD", "/metrics", 200, 2.5)]


@contextlib.contextmanager
def server_logging() -> Iterator[io.StringIO]:
    """``configure_logging("info", "json")`` as ``python -m app`` runs it, its stream a
    buffer; the root logger as it was afterwards. (Entered in the test's body: pytest puts its
    own capturing handlers on the root logger for each phase of a test.)"""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # (logging's own record factory, as in a server without Ray: importing ray, which another
    # test module in this process may have done, installs its own, and the line then takes
    # the record path: test_another_record_factory_takes_the_record_path)
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    configure_logging("info", "json")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    token = request_id_var.set("0123456789abcdef0123456789abcdef")
    try:
        yield stream
    finally:
        request_id_var.reset(token)
        root.handlers, root.level = handlers, level
        logging.setLogRecordFactory(factory)


def _formatted(method: str, path: str, status: int, elapsed: float, cut: bool = False) -> str:
    """What the handler wrote for the record ``logging`` made (the way before)."""
    fields: dict[str, Any] = {"method": method, "path": path, "status": status,
                              "ms": round(elapsed * 1e3, 3), "bytes_in": SIZES["in"],
                              "bytes_out": SIZES["out"]}
    if cut:
        fields["cut"] = True
    return JsonFormatter().format(_access_record(method, path, status, fields)) + "\n"


def _same_but_time(written: str, expected: str, before: float, after: float) -> None:
    got, want = orjson.loads(written), orjson.loads(expected)
    assert list(got) == list(want)  # (the keys, in order)
    assert before - 1e-6 <= got["ts"] <= after + 1e-6
    assert got["ts"] == round(got["ts"], 6)
    # byte for byte, but the time stamp
    assert written == expected.replace(orjson.dumps(want["ts"]).decode(),
                                       orjson.dumps(got["ts"]).decode(), 1)
    assert {k: v for k, v in got.items() if k != "ts"} == {
        k: v for k, v in want.items() if k != "ts"}


def test_the_line_without_a_record_is_the_json_handlers_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[Any] = []
    monkeypatch.setattr(observability, "_access_record",
                        lambda *a: records.append(a) or _access_record(*a))
    with server_logging() as stream:
        _lines_equal(stream)
    assert records == []  # (no record was made)


def _lines_equal(stream: io.StringIO) -> None:
    assert json_handler(access_log) is logging.getLogger().handlers[0]
    for method, path, status, elapsed in REQUESTS:
        before = time.time()
        _access(method, path, status, elapsed, SIZES)
        after = time.time()
        lines = stream.getvalue().splitlines(keepends=True)
        stream.seek(0)
        stream.truncate()
        assert len(lines) == 1
        _same_but_time(lines[0], _formatted(method, path, status, elapsed), before, after)


def test_a_cut_answer_s_line_says_so() -> None:
    """An answer whose head went out and whose end never did (a streamed step cut short): the
    line without a record is still the handler's line, with ``"cut": true`` and a message that
    says how many bytes went out; an answer sent whole has neither."""
    with server_logging() as stream:
        before = time.time()
        _access("POST", "/v1/sessions/s/step", 200, 0.25, SIZES, cut=True)
        line = stream.getvalue()
        _same_but_time(line, _formatted("POST", "/v1/sessions/s/step", 200, 0.25, cut=True),
                       before, time.time())
    got = orjson.loads(line)
    assert got["cut"] is True and got["bytes_out"] == SIZES["out"]
    assert got["msg"] == f"POST /v1/sessions/s/step 200 cut short after {SIZES['out']} bytes"
    assert "cut" not in orjson.loads(_formatted("POST", "/v1/sessions/s/step", 200, 0.25))


def test_the_request_id_is_left_out_as_the_formatter_leaves_it() -> None:
    with server_logging() as stream:
        _no_request_id(stream)


def _no_request_id(server_logging: io.StringIO) -> None:
    token = request_id_var.set(None)
    try:
        _access("GET", "/healthz", 200, 0.0001, SIZES)
        expected = _formatted("GET", "/healthz", 200, 0.0001)
    finally:
        request_id_var.reset(token)
    assert "request_id" not in orjson.loads(server_logging.getvalue())
    _same_but_time(server_logging.getvalue(), expected, 0.0, time.time())


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_second_handler_a_filter_or_the_text_format_take_the_record_path() -> None:
    with server_logging() as stream:
        _record_path(stream)


def _record_path(server_logging: io.StringIO) -> None:
    kept = _Kept()
    access_log.addHandler(kept)
    try:
        assert json_handler(access_log) is None
        _access("POST", "/v1/sessions/s/step", 200, 0.001, SIZES)
    finally:
        access_log.removeHandler(kept)
    # both handlers had the record: the JSON line, and the record with its fields
    assert [r.getMessage() for r in kept.records] == ["POST /v1/sessions/s/step 200"]
    assert kept.records[0].fields["bytes_out"] == SIZES["out"]  # type: ignore[attr-defined]
    _same_but_time(server_logging.getvalue(),
                   _formatted("POST", "/v1/sessions/s/step", 200, 0.001), 0.0, time.time())

    server_logging.seek(0)
    server_logging.truncate()
    access_log.addFilter(lambda record: record.fields["status"] != 404)  # type: ignore[attr-defined]
    try:
        assert json_handler(access_log) is None
        _access("GET", "/v1/sessions/x", 404, 0.001, SIZES)
        _access("GET", "/v1/sessions/x", 200, 0.001, SIZES)
    finally:
        access_log.filters.clear()
    assert [orjson.loads(line)["status"] for line in server_logging.getvalue().splitlines()] == [
        200]

    handler = logging.getLogger().handlers[0]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    server_logging.seek(0)
    server_logging.truncate()
    assert json_handler(access_log) is None
    _access("GET", "/healthz", 200, 0.001, SIZES)
    assert server_logging.getvalue() == "INFO optserve.access: GET /healthz 200\n"


def test_a_handler_above_info_writes_nothing() -> None:
    with server_logging() as stream:
        _above_info(stream)


def _above_info(server_logging: io.StringIO) -> None:
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    assert json_handler(access_log) is None
    _access("GET", "/healthz", 200, 0.001, SIZES)
    assert server_logging.getvalue() == ""


def test_another_record_factory_takes_the_record_path() -> None:
    with server_logging() as stream:
        _other_factory(stream)


def _other_factory(server_logging: io.StringIO) -> None:
    """A record factory of another library's (importing ray installs one): the record is made
    by it, and the line is the JSON handler's line of that record."""
    made: list[logging.LogRecord] = []

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = logging.LogRecord(*args, **kwargs)
        made.append(record)
        return record
    logging.setLogRecordFactory(factory)
    assert json_handler(access_log) is None
    before = time.time()
    _access("POST", "/v1/sessions/s/step", 200, 0.001, SIZES)
    assert [r.getMessage() for r in made] == ["POST /v1/sessions/s/step 200"]
    _same_but_time(server_logging.getvalue(),
                   _formatted("POST", "/v1/sessions/s/step", 200, 0.001), before, time.time())
