"""The SDK's JSON: orjson when installed (10-15x faster than the standard library), the
standard library otherwise; the same compact output either way."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the stdlib still works
    orjson = None  # type: ignore[assignment]


def _numpy_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_dumps(obj: Any) -> bytes:
    """Compact JSON bytes (numpy arrays as lists); refuses NaN/Infinity literals (they must
    be encoded first). orjson when installed: 10-15x faster than the standard library."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_numpy_default)
        except TypeError:  # e.g. a non-string key: the standard library's message is clearer
            pass
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False,
                      default=_numpy_default).encode()


def json_loads(raw: bytes | str) -> Any:
    if orjson is not None:
        return orjson.loads(raw)
    return json.loads(raw)
