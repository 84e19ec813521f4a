"""What decoding a JSON body takes, against what it counts against ``OPTSERVE_MAX_BODIES_MB``.

    .venv/bin/python -m benchmarks.json_decode_peak
    .venv/bin/python -m benchmarks.json_decode_peak --elements 1e6 --tensors 1e5

Each case is decoded as the server decodes a step's body (``app.api.bodies.json_object``
then ``tensor_map``) in a fresh process that first reads the body from a file: the peak RSS
above the RSS before decoding (``VmHWM``, the process's own high-water mark:
``ru_maxrss`` starts at the parent's RSS at the fork), as a multiple of the body's size, beside what
the body counts (``body_memory.JSON_EXPANSION`` times its size plus
``body_memory.JSON_STRUCTURE_BYTES`` for each ``{``, ``[`` and ``"``). Cases: one float32
tensor of N elements written ``0.5`` (the shortest float text), ``1`` (a cached small integer),
``"NaN"`` (a string the decoder converts), a random float's shortest text (as ``json.dumps`` of
torch's values writes it), K one-element tensors (an object each), and what a hostile client
could send in place of N values (the server refuses them once decoded): N ``[[]]`` (two list
objects each), N ``[0]`` and N ``"ab"`` (a string object each). Prints a markdown table; a
peak past what is counted is marked.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys
from app.api.bodies import json_object, tensor_map
from app.errors import Invalid
body = open(sys.argv[1], "rb").read()
def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
base = status("VmRSS")
try:
    tensors = tensor_map(json_object(body)["grads"], "grads")
except Invalid:  # (the hostile cases: decoded, then refused)
    pass
print(status("VmHWM") - base)
"""


def body_of(case: str, n: int, k: int) -> bytes:
    import orjson
    import torch

    if case == "tensors":
        return orjson.dumps({"grads": {f"p{i}": {"dtype": "float32", "shape": [1],
                                                 "data": [0.5]} for i in range(k)}})
    if case == "random":
        values = torch.randn(n, generator=torch.Generator().manual_seed(0)).tolist()
        return orjson.dumps({"grads": {"w": {"dtype": "float32", "shape": [n],
                                             "data": values}}})
    text = {"0.5": b"0.5", "1": b"1", "NaN": b'"NaN"', "[[]]": b"[[]]", "[0]": b"[0]",
            '"ab"': b'"ab"'}[case]
    return (b'{"grads":{"w":{"dtype":"float32","shape":[%d],"data":[' % n
            + b",".join([text] * n) + b"]}}}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=float, default=1e7, help="N of the one-tensor cases")
    ap.add_argument("--tensors", type=float, default=1e6, help="K of the many-tensor case")
    args = ap.parse_args()
    from app.api import body_memory

    n, k = int(args.elements), int(args.tensors)
    rows = []
    with tempfile.TemporaryDirectory(prefix="optserve-json-peak-") as tmp:
        path = Path(tmp) / "body.json"
        for case in ("0.5", "1", "NaN", "random", "tensors", "[[]]", "[0]", '"ab"'):
            body = body_of(case, n, k)
            path.write_bytes(body)
            objects = body.count(b"{")
            structure = sum(body.count(byte) * cost
                            for byte, cost in body_memory.JSON_STRUCTURE_BYTES)
            del body
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": os.getcwd()})
            size = path.stat().st_size
            peak = int(out.stdout.strip().splitlines()[-1])
            counted = body_memory.JSON_EXPANSION * size + structure
            label = f"{k:,} one-element tensors" if case == "tensors" else \
                f"one tensor of {n:,} `{case}`"
            rows.append((label, size, objects, peak, counted))
    print(f"\nJSON_EXPANSION = {body_memory.JSON_EXPANSION}, "
          f"JSON_OBJECT_BYTES = {body_memory.JSON_OBJECT_BYTES}, "
          f"JSON_LIST_BYTES = {body_memory.JSON_LIST_BYTES}, "
          f"JSON_STRING_BYTES = {body_memory.JSON_STRING_BYTES}\n")
    print("| body | MB | `{` | decoding peak MB | peak / size | counted MB | counted / size | "
          "peak within |")
    print("|---|---|---|---|---|---|---|---|")
    over = False
    for label, size, objects, peak, counted in rows:
        within = peak <= counted
        over |= not within
        print(f"| {label} | {size / 2**20:.1f} | {objects:,} | {peak / 2**20:.0f} | "
              f"{peak / size:.1f} | {counted / 2**20:.0f} | {counted / size:.1f} | "
              f"{'yes' if within else '**no**'} |")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
