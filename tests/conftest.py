"""Shared fixtures: an in-process app client, a live uvicorn server on 127.0.0.1, and the same
server on the Ray engine against a local Ray cluster the tests start (one for the whole run).

Tests that run on both engines take ``engine_url`` parametrized with :data:`ENGINES`; the Ray
ones carry the ``ray`` marker, and the run ends with the Ray suite's time.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx._transports.default as httpx_transports
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.api import malformed_http
from app.api.malformed_http import http_protocol
from app.config import Settings, env_name
from app.main import create_app

# The server's settings are OPTSERVE_* variables: one set where the suite runs (a machine's
# OPTSERVE_API_KEYS or OPTSERVE_DURABILITY, for the server it runs) configured every server the
# tests start, in this process or not, and failed them (every request a 401). The suite's
# servers take only the settings their tests give them. (The suite's own knobs, such as
# OPTSERVE_TEST_FORK_SERVERS, and the SDK's OPTSERVE_API_KEY and OPTSERVE_BASE_URL, are none.)
SERVER_SETTINGS_UNSET = sorted(name for name in map(env_name, Settings.model_fields)
                               if os.environ.pop(name, None) is not None)


# The Ray clusters the tests start are loopback test clusters: no token authentication. Ray
# 2.60 turns it on by default, and a cluster started by ray.init() (the Ray engine's tests that
# are not in the `ray` suite start their own) wrote a token into ~/.ray of whoever ran the
# suite, and failed where HOME cannot be written (a CI user's read-only or missing home).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray makes its sockets in its session folder under the temporary directory
# (TMPDIR/ray/session_<date>_<time>_<pid>/sockets/plasma_store, some 70 bytes more): under a
# deep TMPDIR (a CI runner's work folder) they were past a Unix socket's 107 bytes and no
# cluster started. Its folder is /tmp/ray there, unless RAY_TMPDIR names one.
if len(os.fsencode(tempfile.gettempdir())) + 72 > 107:
    os.environ.setdefault("RAY_TMPDIR", "/tmp")


def pytest_report_header() -> str | None:
    if SERVER_SETTINGS_UNSET:
        return ("server settings in the environment, unset for the suite's servers: "
                + ", ".join(SERVER_SETTINGS_UNSET))
    return None


#: the engines a test runs on: ``@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)``
ENGINES = [pytest.param("embedded", id="embedded"),
           pytest.param("ray", id="ray", marks=[pytest.mark.ray])]
#: the test cluster: logical CPUs of its head node (hosts ask for one each)
RAY_HEAD_CPUS = 4
_RAY_TIME = {"tests": 0, "seconds": 0.0}


# httpx builds a TLS context for every client (certifi's CA bundle parsed: 40 ms of CPU), also
# for one that only ever talks plain HTTP to 127.0.0.1, and the suite makes some 1,500 clients
# in its processes (the SDK's and its own): they share one default context. A client given its
# own ``verify`` or ``cert`` still gets its own; nothing in the suite uses TLS.
_create_ssl_context = httpx_transports.create_ssl_context
_default_ssl_context: list[ssl.SSLContext] = []


def _shared_ssl_context(verify: Any = True, cert: Any = None,
                        trust_env: bool = True) -> ssl.SSLContext:
    if verify is not True or cert is not None or not trust_env:
        return _create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    if not _default_ssl_context:
        _default_ssl_context.append(_create_ssl_context())
    return _default_ssl_context[0]


httpx_transports.create_ssl_context = _shared_ssl_context  # type: ignore[assignment]


def _test_settings(**overrides: object) -> Settings:
    """CPU, a 64 MB body limit and a fresh data directory of its own."""
    values: dict[str, object] = {"device": "cpu", "max_body_mb": 64.0,
                                 "data_dir": Path(tempfile.mkdtemp(prefix="optserve-test-"))}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


#: the HTTP/1.1 protocols the server runs (``LiveServer(http=problem_protocol(name))``)
HTTP_PROTOCOLS = ["httptools", "h11"]


def problem_protocol(name: str) -> Any:
    """The server's protocol class of that name (``"httptools"`` or ``"h11"``, with the
    server's problem answers); the test fails where it could not be made."""
    protocol = (malformed_http.PROBLEM_HTTPTOOLS if name == "httptools"
                else malformed_http.PROBLEM_H11)
    if protocol is None:
        pytest.fail(f"the {name} protocol could not be made")
    return protocol


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The url of a live server at the test settings on each HTTP protocol, for a module's
    tests (a module that needs other settings defines its own ``server``)."""
    with LiveServer(_test_settings(), http=problem_protocol(request.param)).serving() as url:
        yield url


class LiveServer:
    """uvicorn.Server running in a thread, as httpx's own test suite does."""

    def __init__(self, settings: Settings, loop: str = "auto", http: Any = None) -> None:
        self.app = create_app(settings)
        # the HTTP protocol `python -m app` serves with (a refused request gets problem+json)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", http=http or http_protocol(), ws="none",
                                loop=loop)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @contextmanager
    def serving(self) -> Iterator[str]:
        """The base URL while it serves: :meth:`start`, then :meth:`stop`."""
        url = self.start()
        try:
            yield url
        finally:
            self.stop()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """The logging setup as it was before the test. An in-process ``python -m app``
    (``app.__main__.main``, refusing a setting after it set up logging) points the root logger
    at the ``sys.stderr`` of that moment, pytest's capture, which is closed after the test:
    every later record in that worker (a live server's access log) then failed to write
    ("I/O operation on closed file")."""
    root = logging.getLogger()
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate)
             for lg in (root, logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error"))]
    multiprocessing_names = logging.logMultiprocessing
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logging.logMultiprocessing = multiprocessing_names


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` where no server answers: a connection is refused. The port is
    held bound (not listening) until the test ends, so that no other server takes it meanwhile:
    one picked free and released (bound, then closed) was taken by a server of another test
    process on a busy machine, which answered the test's "server down" requests with 404s."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """Base URL of a real uvicorn server on 127.0.0.1 (CPU device), shared by the session."""
    server = LiveServer(_test_settings())
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def http(engine_url: str) -> Iterator[httpx.Client]:
    """A client of the live server (of the engine the test is parametrized with, see
    ENGINES; the embedded one otherwise)."""
    with httpx.Client(base_url=engine_url, timeout=300) as client:
        yield client


@pytest.fixture
def app_client() -> Iterator[TestClient]:
    """The app in-process (no sockets), lifespan included."""
    with TestClient(create_app(_test_settings())) as client:
        yield client


# ----------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster for the whole run (a head node with RAY_HEAD_CPUS logical CPUs on
    this machine; tests add and remove simulated nodes), this process connected as its driver.
    Token authentication is off: a loopback test cluster only. Its workers (the session hosts)
    keep this process's priority: Ray's default renices them to 15, and beside the run's
    other pytest processes a host killed by a test took 60 to 80 s to start again (the
    tests' timeouts ran out), its share of a busy core a thirtieth of theirs."""
    pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_worker_niceness"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": RAY_HEAD_CPUS, "include_dashboard": False,
        "object_store_memory": 256 * 1024 * 1024})
    cluster.connect(namespace="optserve")
    print(f"\nray test cluster at {cluster.address} up in {time.monotonic() - started:.1f} s")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_settings(cluster: Any, **overrides: object) -> Settings:
    """A Ray-engine front on the test cluster: hosts of one logical CPU each, no warm-up."""
    values: dict[str, object] = {"engine": "ray", "ray_address": cluster.address,
                                 "ray_resources": '{"num_cpus": 1}', "warm_up": False,
                                 "ray_placement": "pack", "ray_host_start_timeout_s": 300.0}
    values.update(overrides)
    return _test_settings(**values)


def kill_hosts(data_dir: Path, *, restart: bool = False) -> list[str]:
    """Kill the host actors of a deployment (its data directory): for good (a front starts
    them again from storage when it needs them), or so that Ray restarts them."""
    import ray

    killed = []
    for host in sorted((data_dir / "hosts").glob("*/host.json")):
        name = host.parent.name
        try:
            handle = ray.get_actor(name, namespace="optserve")
        except ValueError:
            continue
        ray.kill(handle, no_restart=not restart)
        killed.append(name)
    return killed


@pytest.fixture(scope="session")
def ray_server(ray_cluster: Any) -> Iterator[str]:
    """Base URL of a real uvicorn server on the Ray engine (hosts on the test cluster), shared
    by the run like ``live_server``."""
    settings = ray_settings(ray_cluster)
    server = LiveServer(settings)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()
        kill_hosts(Path(settings.data_dir))


@pytest.fixture
def engine_url(request: pytest.FixtureRequest) -> str:
    """The live server of the engine this test is parametrized with (see ENGINES)."""
    name = getattr(request, "param", "embedded")
    url: str = request.getfixturevalue("ray_server" if name == "ray" else "live_server")
    return url


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each schemathesis test item (one per API operation) a node id of its own, as
    pytest before 9 gave it: ``...::test_x[GET /healthz]``. pytest 9 builds a test
    function's node id from its ``originalname`` and its parametrization only, and
    schemathesis (4.32) passes the test function's own name there and none, so every
    operation's item had the one node id ``...::test_x``. Run in one process, each still ran;
    under pytest-xdist, whose scheduler keys its work by node id, the items of a test
    collapsed into one: the fuzzing ran its first operation only, and the report tests after
    it (``test_fuzz_openapi``) counted one operation and failed. The id is set as pytest's
    own ``Node`` makes one from a name (its parent's id, a child named so); a pytest that no
    longer takes it is a usage error, not a silent collapse."""
    for item in items:
        if type(item).__name__ != "SchemathesisFunction" or item.parent is None:
            continue
        want = f"{item.parent.nodeid}::{item.name}"
        if item.nodeid == want:
            continue
        item._id = item.parent.id.child(item.name)
        if item.nodeid != want:
            raise pytest.UsageError(f"could not give the schemathesis item {item.name!r} a "
                                    f"node id of its own (it has {item.nodeid!r})")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "ray" in report.keywords:
        _RAY_TIME["seconds"] += report.duration
        if report.when == "call":
            _RAY_TIME["tests"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _RAY_TIME["tests"]:
        terminalreporter.write_line(
            f"ray suite: {_RAY_TIME['tests']} tests in {_RAY_TIME['seconds']:.1f} s "
            "(setup, cluster start and teardown included)")
