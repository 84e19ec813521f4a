"""``python -m app`` for the kill -9 and SIGTERM tests, forked from a process that has already
imported it, instead of started from scratch.

A fresh ``python -m app`` spends 3.5 s of CPU importing torch and the app before it serves; the
kill -9 tests start some 40 servers. Here a ``multiprocessing`` fork server (one per test
process, started with the first server) imports ``app.__main__`` once, and each server is a
child forked from it: its own process (its pid is killed with SIGKILL or SIGTERM, its exit code
is read as ``subprocess.Popen`` gives it), which runs ``app`` as ``python -m app`` does
(``runpy``, ``__main__``) with the environment, working directory and log file it is given.

``OPTSERVE_TEST_FORK_SERVERS=0`` starts them as ``python -m app`` subprocesses instead.

As with any ``multiprocessing`` start method but fork, the child imports the main module of the
process that starts it: under pytest (``python -m pytest``, the ``pytest`` script, an xdist
worker) that is harmless; a script of one's own that starts servers needs the ``if __name__ ==
"__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol


class ServerProcess(Protocol):
    """What the tests use of ``subprocess.Popen`` (a forked server offers the same)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


#: what chooses the kernels torch runs: a server is told what this process was told (where the
#: caller's environment for it names none), so that its arithmetic is the in-process torch's
#: that the tests compare it with bitwise (``ATEN_CPU_CAPABILITY=default`` on an AVX-512 CPU
#: rounds Adam otherwise; a server forked with an environment without it took the CPU's best)
KERNEL_CHOICE = ("ATEN_CPU_CAPABILITY",)


def with_this_kernel_choice(env: dict[str, str]) -> dict[str, str]:
    """``env`` and, where it does not name them, this process's :data:`KERNEL_CHOICE`."""
    return {**{k: os.environ[k] for k in KERNEL_CHOICE if k in os.environ}, **env}


#: what multiprocessing's fork server adds to the temporary directory's path for its socket
#: (``/pymp-XXXXXXXX/listener-XXXXXXXX``), and the longest path a Unix socket takes
_FORKSERVER_SOCKET_SUFFIX = len("/pymp-") + 8 + len("/listener-") + 8
_MAX_SOCKET_PATH = 107


def forking() -> bool:
    """Whether servers are forked: unless ``OPTSERVE_TEST_FORK_SERVERS=0``, and where the fork
    server can make its socket. It listens on a Unix socket in the temporary directory, which a
    deep ``TMPDIR`` (a CI runner's work folder) put past a socket path's bytes: every server
    start failed ("AF_UNIX path too long"); servers are ``python -m app`` subprocesses then."""
    if os.environ.get("OPTSERVE_TEST_FORK_SERVERS", "1") == "0":
        return False
    depth = len(os.fsencode(tempfile.gettempdir()))
    return depth + _FORKSERVER_SOCKET_SUFFIX <= _MAX_SOCKET_PATH


def _limit_files(nofile: int | None) -> None:
    """Lower this process's descriptor limit (soft and hard, as ``prlimit --nofile=N``)."""
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def _serve(env: dict[str, str], cwd: str, log: str, nofile: int | None = None) -> None:
    """In the forked child: ``python -m app`` with this environment, in ``cwd``, its output
    (stdout and stderr) appended to ``log``, its descriptor limit ``nofile`` when given."""
    _limit_files(nofile)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["app"]  # runpy sets argv[0] to app/__main__.py, as -m does
    runpy.run_module("app", run_name="__main__", alter_sys=True)


class _Forked:
    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str]) -> None:
        self._process = process
        self._args = args

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self._args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:  # as Popen: nothing once it has ended
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()


_CONTEXT: Any = None


def start(env: dict[str, str], cwd: Path, log: Path, nofile: int | None = None
          ) -> ServerProcess:
    """``python -m app`` with ``env`` in ``cwd``, its output appended to ``log``, with at most
    ``nofile`` descriptors (``RLIMIT_NOFILE``) when given; torch's kernels are chosen as in
    this process where ``env`` does not choose them (:func:`with_this_kernel_choice`)."""
    env = with_this_kernel_choice(env)
    args = [sys.executable, "-m", "app"]
    with open(log, "ab") as out:  # there before the server starts, as for a subprocess
        if not forking():
            return subprocess.Popen(args, cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: _limit_files(nofile))
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # app.main: what `python -m app` imports once its settings are sound (torch included)
        _CONTEXT.set_forkserver_preload(["app.__main__", "app.main", "tests.forked_server"])
    # daemonic: one a test left running is stopped when its test process exits
    process = _CONTEXT.Process(target=_serve, args=(env, str(cwd), str(log), nofile),
                               daemon=True)
    process.start()
    return _Forked(process, args)
