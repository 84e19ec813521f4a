"""One process per system, driven over a pipe by the driver.

The child pins torch to one intra-op thread, builds the system and answers commands; each
reply is ``("ok", value)`` or ``("error", traceback text)``. Timing happens in the child
(``run`` returns each step's seconds), so the pipe is not measured."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from multiprocessing.connection import Connection
from typing import Any

from benchmarks._peers.base import RunConfig, System, instance_id
from benchmarks._peers.timing import pin_torch_threads, timed

#: longest a command may take before the driver gives up on the system (a 1e7 JSON step or a
#: Ray start on a loaded 2-core machine takes seconds, not minutes)
REPLY_TIMEOUT_S = 900.0


class SystemFailed(RuntimeError):
    pass


def _serve(system: System, conn: Connection) -> None:
    run = timed(system.step)
    handlers: dict[str, Any] = {
        "start": lambda _: system.start(),
        "setup": system.setup,
        "run": run,
        "params": lambda _: system.params(),
        "self_check": lambda _: system.self_check(),
        "info": lambda _: system.info(),
        "teardown": lambda _: system.teardown(),
    }
    while True:
        command, arg = conn.recv()
        if command == "stop":
            system.stop()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", handlers[command](arg)))
        except Exception:  # report it to the driver; the system stays up for teardown/stop
            conn.send(("error", traceback.format_exc()))


def child_main(name: str, durability: str | None, config: RunConfig, conn: Connection) -> None:
    from benchmarks._peers.systems import REGISTRY

    pin_torch_threads(1)
    system = REGISTRY[name](config, durability)
    try:
        _serve(system, conn)
    except (EOFError, KeyboardInterrupt):  # the driver went away
        system.stop()


class SystemProcess:
    """The driver's handle on one system's process."""

    def __init__(self, name: str, durability: str | None, config: RunConfig) -> None:
        self.id = instance_id(name, durability)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(name, durability, config, child),
                                name=f"peers-{self.id}")
        self.proc.start()
        child.close()

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def recv(self, timeout: float = REPLY_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout):
            raise SystemFailed(f"{self.id}: no answer in {timeout:.0f} s")
        try:
            status, value = self.conn.recv()
        except EOFError as exc:
            raise SystemFailed(f"{self.id}: process exited ({self.proc.exitcode})") from exc
        if status != "ok":
            raise SystemFailed(f"{self.id}: {value}")
        return value

    def call(self, command: str, arg: Any = None) -> Any:
        self.send(command, arg)
        return self.recv()

    def close(self, stop_sent: bool = False) -> None:
        try:
            if self.proc.is_alive():
                if not stop_sent:
                    self.send("stop")
                self.recv(timeout=120)
        except (SystemFailed, OSError, EOFError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
