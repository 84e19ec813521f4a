"""optserve beside the alternatives a user would pick, in one run: median ms per optimizer
step as the worker sees it, for N float32 parameters in one tensor, Adam and SGD with
momentum, each system in its own process with torch on one intra-op thread:

- ``in-process``, ``in-process-heap``: a local torch step (the floor), plain and with
  optserve's heap reuse (mallopt);
- ``echo``: the same safetensors bytes posted to a raw ASGI echo under uvicorn (the HTTP floor);
- ``ray``: a Ray actor parameter server (numpy in, numpy out) -- needs ``.[bench]``;
- ``torch-rpc``: a torch RPC parameter server (TensorPipe over TCP,
  ``rref.rpc_sync().step(grad)``); ``torch-rpc-shm`` (TensorPipe's shared-memory transport)
  on request only: it busy-polls and would slow the others;
- ``optserve-binary``, ``optserve-json``: ``python -m app`` as ``scripts/serve`` starts it,
  stepped by a plain httpx client with safetensors or JSON bodies;
- ``disk-fsync``: ``os.write`` + ``os.fsync`` of a 4N-byte record in the data directory (what
  ``durability: step`` adds, at least).

    .venv/bin/python -m benchmarks.peers                                  # everything
    .venv/bin/python -m benchmarks.peers --durability both --rounds 5 --json out.json
    .venv/bin/python -m benchmarks.peers --sizes 1e3 --systems in-process,echo,optserve-binary

Systems are interleaved in rounds (round-robin per case, several rounds), after a CPU spin
and untimed warm-up steps; medians over all rounds. Every system's final parameters are
compared bitwise with an in-process replay of the same steps: the table says "ok" per cell,
and the run exits 1 (after printing) when any cell is not ok.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import orjson

from benchmarks._peers.base import RunConfig
from benchmarks._peers.cases import OPTIMIZERS
from benchmarks._peers.driver import Driver, Plan
from benchmarks._peers.report import markdown, to_json
from benchmarks._peers.systems import DEFAULT_ORDER, REGISTRY
from benchmarks._peers.timing import WARMUP_STEPS, pin_torch_threads


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("OPTSERVE_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OPTSERVE_NAME=VALUE")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7", help="N, comma-separated")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--systems", default=",".join(DEFAULT_ORDER),
                    help=f"of {', '.join(REGISTRY)} (table order as given)")
    ap.add_argument("--durability", choices=["step", "memory", "both"], default="step",
                    help="optserve's OPTSERVE_DURABILITY (step: the server's default; the peers "
                    "persist nothing, so memory is the like-for-like comparison)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=None,
                    help="steps per system per round (default: by N, timing.REPS_PER_ROUND)")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps per case")
    ap.add_argument("--spin", type=float, default=3.0, help="CPU spin (s) before the first case")
    ap.add_argument("--case-spin", type=float, default=1.0, help="CPU spin (s) before each case")
    ap.add_argument("--json-max-n", type=float, default=1e6,
                    help="largest N for optserve-json")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="root of the servers' data directories and the disk probe (default: "
                    "a temp dir on this machine's disk, removed afterwards)")
    ap.add_argument("--peer-heap-reuse", action="store_true",
                    help="apply optserve's mallopt tuning in the Ray actor and torch RPC server "
                    "too (off: the peers as a user would run them)")
    ap.add_argument("--rpc-transports", default="uv",
                    help="TensorPipe transports for torch-rpc (default uv: TCP; shm busy-polls, "
                    "see torch-rpc-shm)")
    ap.add_argument("--rpc-channels", default=None,
                    help="TensorPipe channels for torch-rpc (default: TensorPipe's; basic = "
                    "tensors over the transport too)")
    ap.add_argument("--server-env", action="append", type=_setting, default=[], metavar="K=V",
                    help="an OPTSERVE_* setting for every optserve server (repeatable; e.g. "
                    "OPTSERVE_WARM_UP=0 where nothing is timed); printed with its command")
    ap.add_argument("--parallel-start", action="store_true",
                    help="start every system at once (quicker for a few light systems; Ray's "
                    "start timed out that way on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the full record here")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="record every optserve server with py-spy per case into DIR (raw "
                    "collapsed stacks; perturbs the timings)")
    ap.add_argument("--py-spy-native", action="store_true", help="py-spy --native")
    ap.add_argument("--py-spy-workers", action="store_true",
                    help="also record every system's worker (client) process")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin_torch_threads(1)
    systems = _list(args.systems)
    unknown = [s for s in systems if s not in REGISTRY]
    optimizers = _list(args.optimizers)
    if unknown or any(o not in OPTIMIZERS for o in optimizers):
        print(f"unknown systems or optimizers: {unknown + optimizers}; systems: "
              f"{', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="optserve-peers-"))
    root.mkdir(parents=True, exist_ok=True)
    plan = Plan(
        sizes=[int(float(s)) for s in _list(args.sizes)],
        optimizers=optimizers,
        systems=systems,
        durabilities=["memory", "step"] if args.durability == "both" else [args.durability],
        rounds=args.rounds, reps=args.reps, warmup=args.warmup,
        spin_s=args.spin, case_spin_s=args.case_spin,
        config=RunConfig(str(root), int(args.json_max_n), args.peer_heap_reuse,
                         tuple(_list(args.rpc_transports)) or None,
                         tuple(_list(args.rpc_channels or "")) or None,
                         tuple(args.server_env)),
        seed=args.seed, py_spy_dir=args.py_spy, py_spy_native=args.py_spy_native,
        py_spy_workers=args.py_spy_workers, parallel_start=args.parallel_start,
    )
    command = "python -m benchmarks.peers " + shlex.join(argv if argv is not None
                                                         else sys.argv[1:])
    try:
        result = Driver(plan).run()
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(markdown(result, command))
    if args.json:
        args.json.write_bytes(orjson.dumps(to_json(result, command),
                                           option=orjson.OPT_INDENT_2))
    if not result.ok:
        bad = [f"{c.system} {c.optimizer} N={c.n}: {c.check}" for c in result.cells
               if c.check not in ("ok", "-")]
        print("\nBITWISE CHECK FAILED or a system failed:\n  " + "\n  ".join(
            bad + result.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
