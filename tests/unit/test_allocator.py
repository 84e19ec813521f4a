"""The server's heap policy (``app.runtime``): blocks freed while sessions step stay with the
process, so the next step of the same size takes no fresh pages; ``release_memory`` (what an
idle host and large one-off operations call) gives them back. Run in a child process: the
policy is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, ctypes.util, json, resource
from app.runtime import release_memory, tune_allocator
tune_allocator()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def step():
    # a 1e7-parameter step's blocks: a body, two temporaries, an answer (160 MB in all),
    # written, then freed, the last first (into the heap's free top)
    blocks = [libc.malloc(40 << 20) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, 40 << 20)
    for block in reversed(blocks):
        libc.free(block)

base = rss()
step()
kept = rss()
before = faults()
for _ in range(3):
    step()
again = faults() - before
release_memory()
print(json.dumps({"base": base, "kept": kept, "again": again, "released": rss()}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux",
                    reason="reads /proc (Linux)")
def test_a_steps_blocks_stay_until_released() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    got = json.loads(out.stdout)
    mb = 1 << 20
    # freed, but kept: the heap did not give the 160 MB back
    assert got["kept"] - got["base"] > 120 * mb, got
    # so three more such steps fault in (almost) nothing: 160 MB afresh are ~40,000 each
    assert got["again"] < 2_000, got
    # and release_memory gives it back
    assert got["released"] - got["base"] < 40 * mb, got
