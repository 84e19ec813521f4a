"""The pure parts of ``benchmarks/peers.py``: bitwise comparison, replay, interleaving, the
skip of a system whose dependency is missing, the HTTP systems' safetensors framing."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks._peers import transfer
from benchmarks._peers.base import System
from benchmarks._peers.cases import Case, bitwise_diff, fmt_n, replay
from benchmarks._peers.driver import _available
from benchmarks._peers.timing import interleaved


def test_bitwise_diff_sees_one_ulp() -> None:
    a = np.arange(5, dtype=np.float32)
    assert bitwise_diff(a.copy(), a) is None
    b = a.copy()
    b[3] = np.nextafter(b[3], np.float32(10))
    problem = bitwise_diff(b, a)
    assert problem is not None and "1 of 5" in problem and "at 3" in problem
    assert bitwise_diff(a.astype(np.float64), a) is not None
    # -0.0 and 0.0 compare equal as floats but not as bits
    z = np.zeros(1, dtype=np.float32)
    assert bitwise_diff(-z, z) is not None


def test_replay_is_deterministic_and_depends_on_steps() -> None:
    case = Case("Adam", 100)
    assert bitwise_diff(replay(case, 7), replay(case, 7)) is None
    assert bitwise_diff(replay(case, 7), replay(case, 6)) is not None
    assert case.grad_count == 3 and Case("Adam", 10_000_000).grad_count == 2


def test_interleaved_rotates_and_counts() -> None:
    calls: list[tuple[str, int]] = []

    def runner(name: str):  # type: ignore[no-untyped-def]
        def run(k: int) -> list[float]:
            calls.append((name, k))
            return [0.001] * k
        return run

    samples = interleaved({"a": runner("a"), "b": runner("b"), "c": runner("c")}, rounds=3,
                          reps={"a": 2, "b": 1, "c": 1}, warmup=1)
    assert calls[:3] == [("a", 1), ("b", 1), ("c", 1)]  # warm-up, untimed
    order = [name for name, _ in calls[3:]]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 3, "c": 3}


def test_missing_dependency_skips_with_a_hint() -> None:
    class Needs(System):
        name = "needs"
        requires = "no_such_module_for_peers"
        install_hint = "pip install -e '.[bench]'"

        def setup(self, case: Case) -> None: ...

        def step(self) -> None: ...

    why = _available(Needs)
    assert why is not None and "not installed" in why and ".[bench]" in why


def test_fmt_n() -> None:
    assert [fmt_n(n) for n in (1_000, 10_000_000, 20_000, 25_000)] == ["1e3", "1e7", "2e4",
                                                                "25000"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(1000, generator=g),
            "m": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "h": torch.randn(7, generator=g).to(torch.float16),
            "e": torch.empty(0)}


def test_safetensors_buffers_are_a_body_the_safetensors_package_reads() -> None:
    tensors = _tensors()
    buffers = transfer.safetensors_buffers(tensors)
    # the tensors' own memory, not copies: a change to a tensor shows in its buffer
    tensors["w"][0] = 42.0
    loaded = st_load(b"".join(buffers))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    assert loaded["w"][0].item() == 42.0


def test_read_safetensors_views_the_body() -> None:
    tensors = _tensors()
    body = bytearray(st_save(tensors, metadata={"k": "v"}))
    out = transfer.read_safetensors(body)
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name
    # a view of the body: writing the body changes the tensor (no copy was made)
    header = int.from_bytes(body[:8], "little")
    offset = 8 + header + orjson.loads(bytes(body[8:8 + header]))["w"]["data_offsets"][0]
    body[offset:offset + 4] = torch.tensor([7.5]).numpy().tobytes()
    assert out["w"][0].item() == 7.5


def test_pieces_cut_without_losing_bytes() -> None:
    data = bytes(range(256)) * 4099  # not a multiple of the piece size
    views, length = transfer.pieces([b"head", data, memoryview(b"")])
    assert length == 4 + len(data)
    assert all(0 < len(v) <= transfer.PIECE for v in views)
    assert b"".join(views) == b"head" + data


def test_benchmark_servers_get_only_the_variables_they_print(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``user_defaults``: a benchmark's optserve server runs with the variables its command
    shows and the server's own defaults for everything else: the helper's defaults
    (``SERVER_DEFAULTS``: log level, device, body limit) and the shell's ``OPTSERVE_*`` are
    unset; its fresh data directory is kept."""
    from benchmarks._server import SERVER_DEFAULTS, user_defaults

    monkeypatch.setenv("OPTSERVE_METRICS", "0")
    monkeypatch.setenv("OPTSERVE_DATA_DIR", "/somewhere")
    monkeypatch.setenv("OPTSERVE_TORCH_THREADS", "4")
    env = {"OPTSERVE_PORT": "1", "OPTSERVE_TORCH_THREADS": "1", "OPTSERVE_DURABILITY": "memory"}
    unset = set(user_defaults(env))
    assert set(SERVER_DEFAULTS) | {"OPTSERVE_METRICS"} <= unset
    assert not unset & (set(env) | {"OPTSERVE_DATA_DIR"})
    assert all(k.startswith("OPTSERVE_") for k in unset)


def test_the_targets_are_judged_from_a_runs_medians() -> None:
    """``benchmarks._peers.targets``: each target from the medians of the systems it names
    (made-up milliseconds), reached or not at its limit; one whose systems did not run is
    left out; a saved run (``--json``) gives the same."""
    from types import SimpleNamespace

    from benchmarks._peers.driver import Cell, Result
    from benchmarks._peers.targets import from_json, judge

    ms = {("echo", 1_000): 0.5, ("optserve-binary[memory]", 1_000): 0.99,
          ("in-process", 10_000_000): 20.0, ("echo", 10_000_000): 50.0,
          ("optserve-binary[memory]", 10_000_000): 71.0,
          ("optserve-binary[step]", 10_000_000): 110.0, ("disk-fsync", 10_000_000): 30.0,
          ("optserve-bf16[memory]", 10_000_000): 42.0,
          ("optserve-shm[memory]", 10_000_000): 25.0, ("ray", 10_000_000): 24.0,
          ("torch-rpc", 10_000_000): 60.0}
    cells = [Cell(system, "Adam", n, [v / 1e3, v / 1e3, 9.0], 3, "ok")  # (9 s: one outlier)
             for (system, n), v in ms.items()]
    plan = SimpleNamespace(optimizers=["Adam"], sizes=[1_000, 10_000_000])
    got = {t.what.split(":")[0]: t for t in judge(Result(plan, [], cells=cells))}  # type: ignore[arg-type]
    assert sorted(got) == ["TCP binary, `memory`, 1e3", "TCP binary, `memory`, 1e7",
                           "`step` at 1e7", "bf16 gradients at 1e7", "same host, 1e7"]
    assert got["TCP binary, `memory`, 1e3"].reached  # 0.99 / 0.5 = 1.98 <= 2
    assert got["TCP binary, `memory`, 1e3"].figure.startswith("1.98")
    assert not got["TCP binary, `memory`, 1e7"].reached  # 71 / (50 + 20) > 1
    assert not got["`step` at 1e7"].reached  # +39 > 1.2 x 30
    assert got["bf16 gradients at 1e7"].reached  # 42 / 71 = 0.59
    same_host = got["same host, 1e7"]
    assert not same_host.reached and "ray's 24" in same_host.figure  # 25 > 24, the fastest
    record = {"optimizers": ["Adam"], "sizes": [1_000, 10_000_000], "systems": [],
              "cells": [{"system": c.system, "optimizer": c.optimizer, "n": c.n,
                         "samples_ms": [s * 1e3 for s in c.samples], "steps": c.steps,
                         "check": c.check} for c in cells]}
    assert judge(from_json(record)) == list(got.values())
