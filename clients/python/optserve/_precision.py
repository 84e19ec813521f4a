"""``PrecisionWarning``: an option given as a NumPy floating scalar narrower than float64.

Torch's optimizer given ``lr=np.float32(1e-3)`` computes with it in float32 where it combines
it with Python numbers (NumPy 2's promotion: Adam's ``lr / bias_correction1``), while the value
travels to the session as a Python float of the same value and the session computes in
float64: the steps may differ in the last bits. Warned for every optimizer (which of torch's
do differ depends on the optimizer, its foreach/fused path and torch's version)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np


class PrecisionWarning(UserWarning):
    """An option value the session computes with at another precision than torch would."""


def _narrow_dtype(value: Any) -> np.dtype[Any] | None:
    """The dtype of a NumPy floating scalar narrower than float64 in ``value`` (itself, or an
    element of a tuple or list such as ``betas``), else None."""
    if isinstance(value, np.floating):
        return value.dtype if value.dtype.itemsize < 8 else None
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _narrow_dtype(item)
            if found is not None:
                return found
    return None


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside optserve and torch (the user's line),
    counted from the function calling ``warnings.warn`` (this one's caller)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if not (name == "optserve" or name.startswith(("optserve.", "torch."))):
            break
        frame = frame.f_back
        level += 1
    return level


class NarrowFloatOptions:
    """Warns once per option name (per optimizer: one of these each) when an option is a
    NumPy floating scalar narrower than float64."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def check(self, optimizer: str, options: Mapping[str, Any]) -> None:
        for key, value in options.items():
            if key in self._warned:
                continue
            dtype = _narrow_dtype(value)
            if dtype is None:
                continue
            self._warned.add(key)
            warnings.warn(
                f"{optimizer} option {key!r} holds a NumPy {dtype} scalar ({value!r}): a local "
                f"torch optimizer given it may compute with it in {dtype} (NumPy's scalar "
                "arithmetic, such as Adam's lr / bias_correction1), while the session receives "
                "its value as a Python float and computes in float64, so the steps may differ "
                "from a local torch optimizer's in the last bits; pass float(x) (the session's "
                "steps then equal torch's given that float) to silence this warning",
                PrecisionWarning, stacklevel=_outside_stacklevel())
