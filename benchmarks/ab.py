"""A/B benchmark: two optserve servers, each started from its own source tree, stepped in turn
by one client; prints the median (and p90) milliseconds per step of each as a markdown table.

This is the tool behind the A/B figures in the notes and CHANGELOG.md (an old commit against
the working tree, or one tree under two settings): run it and paste its output.

    git worktree add /tmp/old <commit>
    .venv/bin/python -m benchmarks.ab --trees /tmp/old . --n 1e7 --optimizer Adam \
        --body binary --query "upcast=true&params_dtype=bfloat16" --reps 16
    .venv/bin/python -m benchmarks.ab --trees /tmp/old . --n 1e6 --optimizer SGD \
        --body json-b64 --workers 4 --reps 8
    .venv/bin/python -m benchmarks.ab --trees . . --env-a OPTSERVE_TORCH_THREADS=1 \
        --env-b OPTSERVE_TORCH_THREADS= --n 1e5 --reps 200
    .venv/bin/python -m benchmarks.ab --trees /tmp/old . --env OPTSERVE_DURABILITY=step \
        --n 1e7 --reps 12

What it measures: the wall time, as the client sees it, of one ``POST /v1/sessions/{id}/step``
(N float32 parameters in one tensor ``w``, the same gradient every time, the answer read in
full but not decoded), or with ``--workers K`` of one synchronous round (K concurrent pushes
from K threads, one ``httpx.Client`` and ``X-Optserve-Worker: w<i>`` each, until the last
answer). Bytes move as ``benchmarks.peers`` moves them (``benchmarks/_peers/transfer.py``: the
body in 256 KB pieces with its Content-Length, the answer into one buffer of its length), so
a large body costs the client no re-slicing copies of its own. The servers run at the same
time; each rep steps both, alternating which goes first (even reps a then b, odd reps b then
a); the first 2 reps are warm-up. Every answer must be 200. At the end both servers'
parameters are compared bitwise (``ok`` or ``DIFFER`` in the table; meaningful only when both
trees compute identically, so it is printed, never fatal).

Each server is started as ``scripts/serve`` starts it: ``<this python> -m app`` in its tree,
with this process's environment minus every ``OPTSERVE_*`` variable, plus ``OPTSERVE_PORT`` (a
free loopback port), a fresh ``OPTSERVE_DATA_DIR`` and what ``benchmarks._server`` sets
(``OPTSERVE_DEVICE=cpu``, ``OPTSERVE_MAX_BODY_MB=2048``, ``OPTSERVE_LOG_LEVEL=warning``), then
``--env K=V`` (both) and ``--env-a``/``--env-b`` (one side each); ``K=`` unsets K (the server's
default). Everything else is at the server's default. The output names each server's exact
``OPTSERVE_*`` variables and command line.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks._peers import cases, transfer
from benchmarks._server import SERVER_DEFAULTS, free_port, server

#: the optimizers and their options, by torch class name (as benchmarks.peers steps them)
OPTIMIZERS: dict[str, dict[str, Any]] = {spec.name: spec.options
                                         for spec in cases.OPTIMIZERS.values()}
BODIES = ("binary", "json", "json-b64")
#: untimed reps at the start (each steps both servers)
WARMUP_REPS = 2
START_TIMEOUT_S = 180.0
PREFIX = "OPTSERVE_"
BINARY = "application/octet-stream"
JSON = "application/json"
#: starts on a fresh port when the one picked was taken before the server bound it
START_ATTEMPTS = 3


@dataclass
class Side:
    """One server: its tree, how it is started, its clients and its times."""

    name: str
    tree: Path
    shown: str  # the tree as given on the command line
    commit: str
    settings: list[tuple[str, str]]  # --env then --env-a/--env-b, in order
    log: Path
    port: int = 0
    data_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    url: str = ""
    session: str = ""
    clients: list[httpx.Client] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app"]

    def configure(self) -> None:
        """A free port, a fresh data directory and the environment they go with."""
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix=f"optserve-ab-{self.name}-")
        self.env, self.unset = server_env(self.port, self.data_dir, self.settings)

    def shell_line(self) -> str:
        """The command line that starts this server again, in a POSIX shell."""
        drop = [f"-u {shlex.quote(k)}" for k in self.unset if k in os.environ]
        sets = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        cmd = " ".join(shlex.quote(c) for c in self.command())
        return f"cd {shlex.quote(str(self.tree))} && env {' '.join([*drop, *sets])} {cmd}"


def server_env(port: int, data_dir: str,
               settings: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """(variables to set, variables to remove) over this process's environment: no inherited
    ``OPTSERVE_*`` variable survives, ``benchmarks._server``'s defaults, the port and the data
    directory are set, then each setting in order (an empty value removes the variable)."""
    env = {**SERVER_DEFAULTS, "OPTSERVE_PORT": str(port), "OPTSERVE_DATA_DIR": data_dir}
    unset = {k for k in os.environ if k.startswith(PREFIX)}
    for key, value in settings:
        if value:
            env[key] = value
        else:
            env.pop(key, None)
            unset.add(key)
    return env, sorted(unset - env.keys())


def parse_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(c.isspace() for c in key):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K=V (or K= to unset K)")
    if key == "OPTSERVE_PORT":
        raise argparse.ArgumentTypeError("OPTSERVE_PORT is picked by the benchmark")
    return key, value


def parse_n(text: str) -> int:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"{text!r}: N must be a positive integer")
    return int(n)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def git_commit(tree: Path) -> str:
    """``git rev-parse --short HEAD`` of the tree (``+dirty`` with uncommitted changes to
    tracked files; ``?`` outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return commit + ("+dirty" if dirty else "")


def app_origin(tree: Path) -> str:
    """Where ``python -m app`` in this tree imports ``app`` from (it must be the tree's own)."""
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('app').origin)"],
        cwd=tree, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                       if not k.startswith(PREFIX)})
    return out.stdout.strip() if out.returncode == 0 else f"? ({out.stderr.strip()[-300:]})"


def log_tail(path: Path, start: int = 0, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def start(side: Side) -> tuple[AbstractContextManager[str], str]:
    """Start the side's server and wait for ``/readyz``; a fresh port when the first was taken
    meanwhile. Returns the entered context manager (to exit) and the base URL."""
    for attempt in range(1, START_ATTEMPTS + 1):
        side.configure()
        offset = side.log.stat().st_size if side.log.exists() else 0
        cm = server(env=side.env, command=side.command(), port=side.port,
                    start_timeout_s=START_TIMEOUT_S, log=side.log, cwd=side.tree,
                    unset=side.unset)
        try:
            return cm, cm.__enter__()
        except RuntimeError as exc:
            tail = log_tail(side.log, offset)
            shutil.rmtree(side.data_dir, ignore_errors=True)
            if "address already in use" in tail.lower() and attempt < START_ATTEMPTS:
                continue
            raise RuntimeError(f"server {side.name} ({side.tree}) did not start: {exc}\n"
                               f"  command: {side.shell_line()}\n  its log ({side.log}):\n"
                               f"{tail}") from None
    raise AssertionError("unreachable")


def check_status(side: Side, what: str, got: int, text: str, status: int = 200) -> None:
    if got != status:
        raise RuntimeError(f"server {side.name}: {what} answered {got} (expected {status}): "
                           f"{text[:3000]}")


def check(resp: httpx.Response, side: Side, what: str, status: int = 200) -> None:
    check_status(side, what, resp.status_code, resp.text, status)


def check_answer(answer: tuple[int, bytearray], side: Side, what: str) -> None:
    """A step's answer as :func:`benchmarks._peers.transfer.post` returns it: 200 or fail."""
    got, body = answer
    check_status(side, what, got, bytes(body[:3000]).decode(errors="replace"))


def b64_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode()


def truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "on")


@dataclass
class Plan:
    """What every side is stepped with: the step URL's tail, headers and body."""

    query: str
    headers: dict[str, str]
    body: bytes
    workers: int


def make_plan(args: argparse.Namespace) -> Plan:
    grad = torch.randn(args.n, generator=torch.Generator().manual_seed(1))
    parts = [args.query.lstrip("?")] if args.query.lstrip("?") else []
    if args.body == "binary":
        upcast = any(k == "upcast" and truthy(v) for k, v in parse_qsl(args.query.lstrip("?")))
        body = st_save({"w": grad.to(torch.bfloat16 if upcast else torch.float32)})
        headers = {"Content-Type": BINARY, "Accept": BINARY}
    else:
        body = orjson.dumps({"grads": {"w": {"dtype": "float32", "shape": [args.n],
                                             "b64": b64_of(grad)}}})
        headers = {"Content-Type": JSON, "Accept": JSON}
        if args.body == "json-b64":
            parts.append("encoding=b64")
    return Plan("?" + "&".join(parts) if parts else "", headers, body, args.workers)


def create_session(side: Side, args: argparse.Namespace) -> None:
    params = torch.randn(args.n, generator=torch.Generator().manual_seed(0))
    spec: dict[str, Any] = {
        "optimizer": args.optimizer, "options": OPTIMIZERS[args.optimizer],
        "params": {"w": {"dtype": "float32", "shape": [args.n], "b64": b64_of(params)}}}
    if args.workers > 1:
        spec["sync"] = {"workers": args.workers, "reduce": "mean", "timeout_s": 120}
    resp = side.clients[0].post("/v1/sessions", content=orjson.dumps(spec),
                                headers={"Content-Type": JSON, "Accept": JSON})
    check(resp, side, "POST /v1/sessions", 201)
    side.session = resp.json()["id"]


def stepper(side: Side, plan: Plan, pool: ThreadPoolExecutor | None) -> Callable[[], float]:
    """One timed step (or sync round) of this side, in ms."""
    url = f"/v1/sessions/{side.session}/step{plan.query}"

    def push(i: int) -> tuple[int, bytearray]:
        headers = {**plan.headers, "X-Optserve-Worker": f"w{i}"}
        return transfer.post(side.clients[i], url, [plan.body], headers)

    def one() -> float:
        t0 = time.perf_counter()
        answer = transfer.post(side.clients[0], url, [plan.body], plan.headers)
        ms = (time.perf_counter() - t0) * 1e3
        check_answer(answer, side, f"POST {url}")
        return ms

    def round_() -> float:
        assert pool is not None
        t0 = time.perf_counter()
        futures = [pool.submit(push, i) for i in range(plan.workers)]
        answers = [f.result() for f in futures]
        ms = (time.perf_counter() - t0) * 1e3
        for i, answer in enumerate(answers):
            check_answer(answer, side, f"POST {url} (worker w{i})")
        return ms

    return one if plan.workers == 1 else round_


def params_of(side: Side) -> dict[str, torch.Tensor]:
    resp = side.clients[0].get(f"/v1/sessions/{side.session}/params", headers={"Accept": BINARY})
    check(resp, side, "GET params")
    return st_load(resp.content)


def check_steps(side: Side, want: int) -> None:
    """Each timed call was one optimizer step (a sync round steps once, not once per push)."""
    resp = side.clients[0].get(f"/v1/sessions/{side.session}", headers={"Accept": JSON})
    check(resp, side, "GET session")
    step = resp.json()["step"]
    if step != want:
        raise RuntimeError(f"server {side.name}: the session took {step} steps, expected {want}")


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().view(-1).view(torch.uint8),
                           y.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]



def running(sides: list[Side], stack: ExitStack) -> None:
    """Start both servers at once (each entered server is exited by ``stack``)."""
    with ThreadPoolExecutor(len(sides)) as pool:
        futures = [pool.submit(start, side) for side in sides]
        errors = []
        for side, future in zip(sides, futures, strict=True):
            try:
                cm, side.url = future.result()
            except RuntimeError as exc:
                errors.append(str(exc))
                continue
            stack.push(cm.__exit__)
    if errors:
        raise SystemExit("\n".join(errors))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Step two optserve servers, each started from its own source tree, in "
        "turn from one client; print median ms per step (per round with --workers) of each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--trees", nargs=2, required=True, metavar=("A", "B"), type=Path,
                    help="source trees of server a and server b (e.g. a `git worktree add` "
                    "of an old commit, and .); the same tree twice compares settings")
    ap.add_argument("--n", type=parse_n, default=1_000_000,
                    help="parameters (float32, one tensor); 1e7 style accepted")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="Adam",
                    help="Adam (lr 1e-3) or SGD (lr 0.01, momentum 0.9)")
    ap.add_argument("--body", choices=BODIES, default="binary",
                    help="binary: a safetensors body, safetensors answer (bfloat16 gradient "
                    "when the query has upcast=true); json: base64 float32 gradient in JSON, "
                    "JSON answer; json-b64: the same with encoding=b64 (base64 answer)")
    ap.add_argument("--query", default="",
                    help="appended to the step URL, e.g. 'upcast=true&params_dtype=bfloat16'")
    ap.add_argument("--workers", type=positive_int, default=1,
                    help="K > 1: a sync session (K workers, mean); each timed round is K "
                    "concurrent pushes")
    ap.add_argument("--reps", type=positive_int, default=20,
                    help=f"steps (rounds) per server, the first {WARMUP_REPS} untimed")
    ap.add_argument("--pause-s", type=float, default=0.0,
                    help="seconds to wait after each rep, both servers idle (a worker's "
                    "forward and backward pass between steps)")
    ap.add_argument("--env", action="append", type=parse_setting, default=[], metavar="K=V",
                    help="a variable for both servers (repeatable); K= unsets K")
    ap.add_argument("--env-a", action="append", type=parse_setting, default=[],
                    metavar="K=V", help="a variable for server a only (after --env)")
    ap.add_argument("--env-b", action="append", type=parse_setting, default=[],
                    metavar="K=V", help="a variable for server b only (after --env)")
    args = ap.parse_args(argv)
    if args.reps <= WARMUP_REPS:
        ap.error(f"--reps must be more than the {WARMUP_REPS} warm-up reps")
    if not args.pause_s >= 0:
        ap.error("--pause-s must be a number of seconds >= 0")
    for tree in args.trees:
        if not (tree / "app" / "__main__.py").is_file():
            ap.error(f"{tree}: not an optserve source tree (no app/__main__.py)")
    return args


def header(args: argparse.Namespace, sides: list[Side], plan: Plan) -> Iterator[str]:
    unit = (f"ms per round ({args.workers} concurrent pushes)" if args.workers > 1
            else "ms per step")
    yield (f"### optserve A/B: {args.optimizer}, N = {args.n:,}, body {args.body}, "
           f"{args.workers} worker{'s' if args.workers > 1 else ''}, {args.reps} reps "
           f"({WARMUP_REPS} warm-up)")
    yield ""
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    yield f"- command: `{shlex.quote(sys.executable)} -m benchmarks.ab {argv}` (in {os.getcwd()})"
    yield (f"- torch {torch.__version__}, httpx {httpx.__version__}, Python "
           f"{sys.version.split()[0]}, {os.cpu_count()} CPUs")
    yield (f"- timed: {unit}, POST /v1/sessions/{{id}}/step{plan.query}, "
           f"{len(plan.body):,} body bytes; reps alternate which server goes first"
           + (f"; {args.pause_s:g} s pause after each rep" if args.pause_s else ""))
    for side in sides:
        yield (f"- {side.name}: tree `{side.tree}` at `{side.commit}`, app from "
               f"`{app_origin(side.tree)}`")
        env = " ".join(f"{k}={v}" for k, v in sorted(side.env.items()))
        yield f"  - env: `{env}`" + (f" (unset: {' '.join(side.unset)})" if side.unset else "")
        yield f"  - command: `{side.shell_line()}`"
        if (side.tree / ".env").exists():
            yield f"  - note: `{side.tree / '.env'}` exists; the server reads it too"


def table(sides: list[Side], same: bool) -> Iterator[str]:
    yield "| tree | commit | median ms | p90 ms | runs | bitwise |"
    yield "|---|---|---:|---:|---:|---|"
    for side in sides:
        yield (f"| {side.name}: {side.shown} | {side.commit} | "
               f"{statistics.median(side.times_ms):.2f} | {p90(side.times_ms):.2f} | "
               f"{len(side.times_ms)} | {'ok' if same else 'DIFFER'} |")
    a, b = (statistics.median(s.times_ms) for s in sides)
    yield ""
    yield f"b / a = {b / a:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="optserve-ab-logs-"))
    sides = [Side(name, tree.resolve(), str(tree), git_commit(tree), [*args.env, *own],
                  logs / f"{name}.log")
             for name, tree, own in zip("ab", args.trees, (args.env_a, args.env_b),
                                        strict=True)]
    plan = make_plan(args)
    try:
        with ExitStack() as stack:
            running(sides, stack)
            for side in sides:
                side.clients = [stack.enter_context(httpx.Client(base_url=side.url,
                                                                 timeout=600))
                                for _ in range(args.workers)]
                create_session(side, args)
            pool = (stack.enter_context(ThreadPoolExecutor(args.workers))
                    if args.workers > 1 else None)
            steps = {side.name: stepper(side, plan, pool) for side in sides}
            print(f"ab: servers a ({sides[0].url}) and b ({sides[1].url}) ready; "
                  f"{args.reps} reps", file=sys.stderr, flush=True)
            for rep in range(args.reps):
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    ms = steps[side.name]()
                    if rep >= WARMUP_REPS:
                        side.times_ms.append(ms)
                if args.pause_s:
                    time.sleep(args.pause_s)
            for side in sides:
                check_steps(side, args.reps)
            same = bitwise_equal(params_of(sides[0]), params_of(sides[1]))
            print("\n".join(header(args, sides, plan)))
            print()
            print("\n".join(table(sides, same)))
    finally:
        for side in sides:
            if side.data_dir:
                shutil.rmtree(side.data_dir, ignore_errors=True)
        written = [s.log for s in sides if s.log.exists() and s.log.stat().st_size]
        if written:
            print(f"\n(server output kept in {', '.join(map(str, written))})", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
