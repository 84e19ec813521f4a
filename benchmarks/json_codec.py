"""The JSON tensor codec against orjson alone (issue 9: "JSON within 2x of orjson's
encode+decode of the same floats").

    .venv/bin/python -m benchmarks.json_codec                    # N = 1e3 .. 1e6
    .venv/bin/python -m benchmarks.json_codec --sizes 1e6 --reps 9

Per N float32 values, median ms of:

- ``orjson``: ``orjson.loads`` of a step body ``{"grads": {"w": {"dtype", "shape", "data"}}}``
  plus ``np.asarray(..., float32)`` of its list, and ``orjson.dumps`` of the answer's
  ``{"params": {"w": {..., "data": <numpy array>}}}`` (``OPT_SERIALIZE_NUMPY``): the floor,
  with no checks;
- ``server``: the server's own code for the same two bodies: ``app.api.bodies.json_object`` +
  ``tensor_map`` (every check a request gets: keys, dtype, shape, value kinds, non-finite
  strings) and ``encode_json_tensor`` + ``orjson.dumps`` of the answer (the non-finite check
  of the values included).

Prints a markdown table with the ratio (target: at most 2).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import orjson
import torch

from app.api.bodies import json_object, tensor_map
from app.wire.json_tensor import encode_json_tensor
from benchmarks._timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| N | orjson encode+decode | server decode+encode | ratio |")
    print("|---|---|---|---|")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        a, b = median_ms(_floor(n), args.reps), median_ms(_server(n), args.reps)
        print(f"| {n:.0e} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)


def _bodies(n: int) -> tuple[bytes, torch.Tensor]:
    body = orjson.dumps({"grads": {"w": {"dtype": "float32", "shape": [n],
                                         "data": torch.randn(n).numpy()}}},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    return body, torch.randn(n)


def _floor(n: int) -> Any:
    body, params = _bodies(n)

    def floor() -> None:
        obj = orjson.loads(body)
        np.asarray(obj["grads"]["w"]["data"], dtype=np.float32)
        orjson.dumps({"params": {"w": {"dtype": "float32", "shape": [n],
                                       "data": params.numpy()}}},
                     option=orjson.OPT_SERIALIZE_NUMPY)
    return floor


def _server(n: int) -> Any:
    body, params = _bodies(n)

    def server() -> None:
        tensor_map(json_object(body)["grads"], "grads", sparse=True)
        orjson.dumps({"params": {"w": encode_json_tensor(params)}},
                     option=orjson.OPT_SERIALIZE_NUMPY)
    return server


if __name__ == "__main__":
    main()
