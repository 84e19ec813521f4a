"""What a session asks of the host that holds it: resources and a placement policy.

``resources`` (create body, or ``OPTSERVE_RAY_RESOURCES`` for the default) is what the
session's host asks Ray for: ``num_cpus`` and ``num_gpus`` (fractions allowed: four hosts of
``num_gpus: 0.25`` share one GPU), ``memory`` (bytes) and custom ``resources``
(``{"name": amount}``, e.g. a node label a cluster defines). ``placement`` chooses among the
hosts that offer exactly those resources: ``pack`` or ``spread``
(:mod:`app.engine.ray_host` documents both). The embedded engine checks both and ignores them:
it has one host.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import Invalid

PLACEMENTS = ("pack", "spread")
_NUMBERS = ("num_cpus", "num_gpus", "memory")
_CUSTOM_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def _amount(value: object, field: str, *, whole: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value) or value < 0:
        raise Invalid("must be a finite number >= 0", code="invalid_resources", field=field)
    number = float(value)
    if whole and number != int(number):
        raise Invalid("must be a whole number", code="invalid_resources", field=field)
    if 1 < number != int(number) and not whole:
        raise Invalid("amounts above 1 must be whole numbers (Ray's rule)",
                      code="invalid_resources", field=field)
    return number


def check_resources(obj: object, field: str = "resources") -> dict[str, Any]:
    """A resources object, normalized: numbers as floats, custom resources sorted."""
    if not isinstance(obj, dict):
        raise Invalid("resources must be an object {num_cpus, num_gpus, memory, resources}",
                      code="invalid_resources", field=field)
    unknown = sorted(set(obj) - {*_NUMBERS, "resources"})
    if unknown:
        raise Invalid(f"unknown resource {unknown[0]!r:.40}; give num_cpus, num_gpus, memory, "
                      "or custom ones under resources", code="invalid_resources",
                      field=f"{field}.{unknown[0]}")
    out: dict[str, Any] = {}
    for key in _NUMBERS:
        if key in obj:
            out[key] = _amount(obj[key], f"{field}.{key}", whole=key == "memory")
    custom = obj.get("resources")
    if custom is not None:
        if not isinstance(custom, dict):
            raise Invalid("resources.resources must be an object {name: amount}",
                          code="invalid_resources", field=f"{field}.resources")
        checked = {}
        for name, amount in sorted(custom.items()):
            if not isinstance(name, str) or not _CUSTOM_RE.fullmatch(name) \
                    or name in ("CPU", "GPU", "memory"):
                raise Invalid(f"invalid custom resource name {name!r:.40}",
                              code="invalid_resources", field=f"{field}.resources")
            checked[name] = _amount(amount, f"{field}.resources.{name}")
        if checked:
            out["resources"] = checked
    return out


def check_placement(value: object, field: str = "placement") -> str:
    if value not in PLACEMENTS:
        raise Invalid(f"placement must be one of {list(PLACEMENTS)}", code="invalid_body",
                      field=field)
    return str(value)


def shape_key(resources: dict[str, Any]) -> str:
    """A canonical text for a resources object (hosts with the same one are alike)."""
    parts = [f"{k}={resources[k]:g}" for k in _NUMBERS if resources.get(k)]
    parts += [f"{k}={v:g}" for k, v in sorted((resources.get("resources") or {}).items()) if v]
    return ",".join(parts) or "none"
