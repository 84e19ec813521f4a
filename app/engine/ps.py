"""Parameter-server mode: many workers, one session.

- :class:`PsConfig`: the session options ``sync`` (synchronous rounds of K workers),
  ``max_staleness`` and ``staleness_lr`` (asynchronous pushes with bounded staleness), parsed
  and validated here for both creation and ``configure`` (PATCH), persisted with the session.
- :func:`reduce`: a round's gradients to one gradient per tensor, exactly and deterministically:
  per tensor, over the workers that sent it, summed in ascending order of worker id (one
  ``add_`` after another, never a tree or a kernel-chosen order), then for ``mean`` divided
  once by the number of those workers. Runs on the device worker.
- the rounds themselves live in the session host (:mod:`app.engine.rounds`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from app.engine import sparse
from app.engine.interface import Tensors
from app.errors import Invalid

Reduce = Literal["mean", "sum"]
OnTimeout = Literal["fail", "apply_partial"]
StalenessLr = Literal["none", "inverse"]

PS_KEYS = ("sync", "max_staleness", "staleness_lr")
SYNC_KEYS = ("workers", "reduce", "timeout_s", "on_timeout")
MAX_WORKERS = 10_000
MAX_TIMEOUT_S = 86_400.0
DEFAULT_TIMEOUT_S = 60.0
MAX_WAIT_S = 60.0  # long-poll cap for GET .../params?wait_s=
_WORKER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # (whole: fullmatch)


@dataclass(frozen=True)
class SyncConfig:
    workers: int
    reduce: Reduce = "mean"
    timeout_s: float = DEFAULT_TIMEOUT_S
    on_timeout: OnTimeout = "fail"

    def to_json(self) -> dict[str, Any]:
        return {"workers": self.workers, "reduce": self.reduce, "timeout_s": self.timeout_s,
                "on_timeout": self.on_timeout}


@dataclass(frozen=True)
class PsConfig:
    sync: SyncConfig | None = None
    max_staleness: int | None = None
    staleness_lr: StalenessLr = "none"

    def to_json(self) -> dict[str, Any]:
        return {"sync": self.sync.to_json() if self.sync else None,
                "max_staleness": self.max_staleness, "staleness_lr": self.staleness_lr}


def _int(value: object, field: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Invalid(f"{field} must be an integer from {low} to {high}", code="invalid_option",
                      field=field)
    return value


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise Invalid(f"{field} must be one of {list(choices)}", code="invalid_option",
                      field=field)
    assert isinstance(value, str)
    return value


def _parse_sync(obj: object, base: SyncConfig | None) -> SyncConfig | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise Invalid("sync must be an object {\"workers\": K, \"reduce\": \"mean\" | \"sum\", "
                      "\"timeout_s\": T, \"on_timeout\": \"fail\" | \"apply_partial\"} or null",
                      code="invalid_option", field="sync")
    unknown = sorted(set(obj) - set(SYNC_KEYS))
    if unknown:
        raise Invalid(f"unknown sync option {unknown[0]!r:.60}; expected {list(SYNC_KEYS)}",
                      code="unknown_option", field=f"sync.{unknown[0]}")
    if base is None and "workers" not in obj:
        raise Invalid("sync needs workers (how many distinct workers make a round)",
                      code="missing_field", field="sync.workers")
    cfg = base or SyncConfig(workers=1)
    if "workers" in obj:
        cfg = replace(cfg, workers=_int(obj["workers"], "sync.workers", 1, MAX_WORKERS))
    if "reduce" in obj:
        reduce = _choice(obj["reduce"], "sync.reduce", ("mean", "sum"))
        cfg = replace(cfg, reduce="mean" if reduce == "mean" else "sum")
    if "timeout_s" in obj:
        t = obj["timeout_s"]
        if type(t) not in (int, float) or not math.isfinite(t) or not 0 < t <= MAX_TIMEOUT_S:
            raise Invalid(f"sync.timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]",
                          code="invalid_option", field="sync.timeout_s")
        cfg = replace(cfg, timeout_s=float(t))
    if "on_timeout" in obj:
        on = _choice(obj["on_timeout"], "sync.on_timeout", ("fail", "apply_partial"))
        cfg = replace(cfg, on_timeout="fail" if on == "fail" else "apply_partial")
    return cfg


def parse(obj: Mapping[str, Any], base: PsConfig | None = None) -> PsConfig:
    """Validated parameter-server options. Keys absent from ``obj`` keep ``base``'s values;
    ``sync`` merges field by field into ``base.sync`` (``null`` turns sync rounds off)."""
    base = base or PsConfig()
    unknown = sorted(set(obj) - set(PS_KEYS))
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r:.60}; expected {list(PS_KEYS)}",
                      code="unknown_field", field=unknown[0])
    cfg = base
    if "sync" in obj:
        cfg = replace(cfg, sync=_parse_sync(obj["sync"], base.sync))
    if "max_staleness" in obj:
        s = obj["max_staleness"]
        cfg = replace(cfg, max_staleness=None if s is None
                      else _int(s, "max_staleness", 0, 2**62))
    if "staleness_lr" in obj:
        rule = "none" if obj["staleness_lr"] is None else obj["staleness_lr"]
        rule = _choice(rule, "staleness_lr", ("none", "inverse"))
        cfg = replace(cfg, staleness_lr="inverse" if rule == "inverse" else "none")
    return cfg


def check_requested(obj: Mapping[str, Any]) -> None:
    """What a request (a create, a PATCH) may give that :func:`parse` takes only from records:
    ``staleness_lr: null`` is a 422 naming it (a rule is ``"none"`` or ``"inverse"``; servers
    before this check took null as ``"none"``, and their records replay so)."""
    if "staleness_lr" in obj and obj["staleness_lr"] is None:
        raise Invalid("staleness_lr must be one of ['none', 'inverse'], not null (leave it out "
                      "to keep the session's rule: \"none\" unless set)",
                      code="invalid_option", field="staleness_lr")


def check_takes(optimizer: str, config: PsConfig) -> PsConfig:
    """``config`` for a session of ``optimizer``: LBFGS steps through evaluations, one
    client's closure at a time, and never in synchronous rounds (422 naming ``sync``)."""
    if optimizer == "LBFGS" and config.sync is not None:
        raise Invalid("LBFGS steps through evaluations of one client's closure: it takes no "
                      "synchronous rounds (sync must be null)", code="invalid_option",
                      field="sync")
    return config


def check_worker(worker: str) -> str:
    if not _WORKER_RE.fullmatch(worker):  # (match's $ took a trailing "\n")
        raise Invalid("a worker id (X-Optserve-Worker) is 1-128 characters of letters, digits, "
                      "'.', '_', ':', '@' or '-', starting with a letter or digit",
                      code="invalid_worker", field="X-Optserve-Worker")
    return worker


def reduce(pushes: Mapping[str, Tensors], how: Reduce) -> Tensors:
    """Per tensor, over the workers that sent it: the sum in ascending worker-id order, divided
    by their number for ``mean``. Deterministic: the same pushes give the same bits."""
    order = sorted(pushes)
    names: list[str] = []
    for worker in order:
        names.extend(n for n in pushes[worker] if n not in names)
    out: Tensors = {}
    for name in names:
        senders = [w for w in order if name in pushes[w]]
        if len(senders) == 1:  # nothing to reduce (and nothing is changed: no copy needed)
            out[name] = pushes[senders[0]][name]
            continue
        acc = pushes[senders[0]][name].clone()
        for w in senders[1:]:
            g = pushes[w][name]
            if acc.layout == torch.strided and g.layout == torch.strided:
                acc.add_(g)
            else:  # row-sparse pushes (the same bits: IEEE addition commutes)
                acc = sparse.add_checked(name, acc, g)
        if how == "mean":
            acc.div_(len(senders))
        out[name] = acc
    return out


def staleness_note(base_version: int, version: int, max_staleness: int | None) -> str:
    bound = f"max_staleness {max_staleness}" if max_staleness is not None else "no bound"
    return (f"gradients computed at version {base_version} are {version - base_version} "
            f"versions old; the session is at version {version} ({bound})")

