"""A same-host binding holds no descriptor once its segment is handed over (the server maps it
through libc ``mmap``, not ``mmap.mmap``, which kept a duplicate of the memfd: with the memfd
itself, 2 descriptors a binding), its mapping lasts as long as any view of it (a view kept past
:meth:`Binding.close` still reads and writes the segment; the last one gone unmaps it), and the
server-wide bound on bindings is a setting (``OPTSERVE_MAX_BINDINGS``) validated as the others
are, as is the bound on their memory (``OPTSERVE_MAX_BINDING_MB``). Against a real server:
tests/integration/test_many_bindings_few_descriptors.py."""

from __future__ import annotations

import gc
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.config import Settings
from app.transport.local import Binding


def fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def held(name: str) -> int:
    """This process's descriptors on the segment of binding ``name`` (counted by what they
    point at: a count of all of them moves with whatever other threads of the test process
    open and close meanwhile)."""
    return sum(f"memfd:optserve-{name}" in d for d in fds())


def mapped(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(f"memfd:optserve-{name}" in line for line in maps)


INFO: Any = SimpleNamespace(params={"w": {"dtype": "float32", "shape": [3, 4]},
                                    "b": {"dtype": "float64", "shape": [5]}},
                            durability="memory")


def test_a_handed_over_binding_holds_no_descriptor_and_its_views_keep_the_mapping() -> None:
    binding = Binding("unit-a", INFO)
    assert held("unit-a") == 1  # its memfd alone: the mapping holds none
    fd = binding.hand_over()
    assert binding.fd == -1 and fd >= 0
    os.close(fd)  # (sent to the client: closed by the connection once sent)
    assert held("unit-a") == 0
    assert mapped("unit-a") == 1
    binding.grads["w"].copy_(torch.arange(12.0).view(3, 4))
    kept = binding.params["b"]
    kept.fill_(2.5)
    grad = binding.grads["w"]
    binding.close()
    # a view an operation still holds reads and writes the segment, not freed memory
    assert mapped("unit-a") == 1
    assert torch.equal(grad, torch.arange(12.0).view(3, 4))
    kept.add_(1.0)
    assert torch.equal(kept, torch.full((5,), 3.5, dtype=torch.float64))
    del grad, kept
    gc.collect()
    assert mapped("unit-a") == 0
    assert held("unit-a") == 0


def test_closing_a_binding_not_handed_over_closes_its_descriptor() -> None:
    binding = Binding("unit-b", INFO)
    assert held("unit-b") == 1  # its memfd alone: the mapping holds none
    binding.close()
    gc.collect()
    assert held("unit-b") == 0 and mapped("unit-b") == 0


def test_the_bound_on_bindings_is_a_setting_with_a_default() -> None:
    from app.api.connection_cap import Bounded
    from app.transport.local import default_bindings

    assert Settings(max_bindings=5).max_bindings == 5
    with pytest.raises(ValueError, match="max_bindings"):
        Settings(max_bindings=-1)
    assert Settings().max_bindings == 0
    # an eighth of the process's mappings (vm.max_map_count), at least 64
    assert default_bindings(65530) == 8191
    assert default_bindings(100) == 64
    slots = Bounded(2)  # (LocalTransport.binding_slots)
    assert slots.take() and slots.take() and not slots.take()
    slots.give()
    assert slots.take() and slots.held == 2


def test_the_bound_on_binding_memory_is_a_setting_with_a_default(tmp_path: Any) -> None:
    from app.api.connection_cap import Bounded
    from app.engine.idle import default_memory_bound
    from app.transport.local import footprint

    assert Settings(max_binding_mb=5).max_binding_mb == 5
    with pytest.raises(ValueError, match="max_binding_mb"):
        Settings(max_binding_mb=-1)
    assert Settings().max_binding_mb == 0
    # a binding holds its segment (a gradient and a value slot per parameter, each dtype's
    # run aligned), and a logged session's private copy of the gradients too
    binding = Binding("unit-c", INFO)
    try:
        assert footprint(INFO) == binding.size
        grads = sum(t.numel() * t.element_size() for t in binding.grads.values())
        assert binding.size >= 2 * grads
        logged: Any = SimpleNamespace(params=INFO.params, durability="step")
        assert footprint(logged) == binding.size + (binding.grad_bytes.numel())
    finally:
        binding.close()
    # the default: half of what the cgroup may use where it has a limit, else of the machine
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8000 kB\nMemAvailable: 6000 kB\n")
    assert default_memory_bound(tmp_path) == 4000 * 1024
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("2048000\n")
    (tmp_path / "sys/fs/cgroup/memory.current").write_text("100\n")
    assert default_memory_bound(tmp_path) == 1024000
    assert default_memory_bound(tmp_path / "nothing") == sys.maxsize  # (no bound)
    memory = Bounded(100)  # (LocalTransport.binding_memory: bytes, counted n at a time)
    assert memory.take(60) and not memory.take(41) and memory.take(40)
    memory.give(60)
    assert memory.held == 40 and memory.take(60) and not memory.take(1)
    unbounded = Bounded(sys.maxsize)  # (where the memory cannot be read)
    assert unbounded.take(1 << 60) and unbounded.held == 1 << 60
