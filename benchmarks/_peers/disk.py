"""The disk under optserve's ``durability: step``: append a 4N-byte record (the float32
gradient, as the server's write-ahead log does) to a file in the data directory with
``os.write`` and ``os.fsync`` it. Not an optimizer: its own table, checked by the file size."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks._peers.base import GradSystem, register
from benchmarks._peers.cases import Case


@register
class DiskFsync(GradSystem):
    name = "disk-fsync"
    check = "self"

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        folder = Path(self.config.data_dir) / "disk-fsync"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "records.bin"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.records = [g.numpy().tobytes() for g in self.grads]

    def exchange(self, grad_index: int) -> None:
        view = memoryview(self.records[grad_index])
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def self_check(self) -> str | None:
        size = os.fstat(self.fd).st_size
        want = self.steps * 4 * self.case.n
        return None if size == want else f"file holds {size} bytes, want {want}"

    def teardown(self) -> None:
        os.close(self.fd)
        self.path.unlink()
