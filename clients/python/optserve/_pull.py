"""``optserve.pull_params``: copy a session's current parameters into local tensors (a late
joiner of a parameter-server session, an evaluation process following training).

Which local tensor receives which session parameter:

- ``into`` an ``nn.Module``: by ``module.named_parameters()`` names (``"0.weight"``, ...: the
  names ``RemoteOptimizer(model.named_parameters(), ...)`` gives a session); when none of those
  names is in the session, by position in ``module.parameters()`` order as ``"0"``, ``"1"``,
  ... (the names ``RemoteOptimizer(model.parameters(), ...)`` gives).
- ``into`` a mapping ``{name: tensor}``: by its keys.
- ``into`` an iterable of ``(name, tensor)`` pairs: by those names; of bare tensors: by
  position, ``"0"``, ``"1"``, ...

Every pulled session parameter must have a local tensor of the same shape (``ValueError``
otherwise, before anything is copied); local tensors the session does not hold are left alone.
Pass ``names`` to pull only some parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._client import Client
from ._gc import gc_paused
from ._types import ParamsResult

__all__ = ["pull_params"]

Into = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[Any]


def _local_tensors(into: Into, session_names: Iterable[str]) -> dict[str, torch.Tensor]:
    if isinstance(into, torch.nn.Module):
        named: dict[str, torch.Tensor] = dict(into.named_parameters())
        if named.keys() & set(session_names):
            return named
        return {str(i): p for i, p in enumerate(into.parameters())}
    if isinstance(into, Mapping):
        return {str(k): v for k, v in into.items()}
    if isinstance(into, torch.Tensor):
        raise TypeError("into must be a module, a mapping or an iterable of tensors, not a "
                        "single tensor")
    out: dict[str, torch.Tensor] = {}
    for i, item in enumerate(into):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out[item[0]] = item[1]
        elif isinstance(item, torch.Tensor):
            out[str(i)] = item
        else:
            raise TypeError(f"into[{i}] is neither a tensor nor a (name, tensor) pair")
    return out


def pull_params(
    client: Client,
    session_id: str,
    into: Into,
    names: Iterable[str] | None = None,
    *,
    binary: bool = True,
    params_dtype: str | None = None,
) -> ParamsResult:
    """Fetch the session's current parameters (``GET .../params``) and copy them in place into
    the matching local tensors (see the module docstring for the matching rule). Returns the
    :class:`ParamsResult` (its ``version`` is the version the local values now come from).

    ``params_dtype="bfloat16"`` (or ``"float16"``): the floating parameters wider than it
    travel narrowed (:meth:`Client.get_params`) and are widened into the local tensors: each
    then holds the session's value rounded to that dtype (half the bytes of a float32 pull)."""
    result = client.get_params(session_id, names, binary=binary, params_dtype=params_dtype)
    local = _local_tensors(into, result.params)
    missing = [n for n in result.params if n not in local]
    if missing:
        raise ValueError(f"session {session_id!r} holds {missing[:10]} that have no local tensor "
                         f"(local names: {list(local)[:10]}); pass names= to pull a subset")
    for name, value in result.params.items():
        target = local[name]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{name!r} has shape {tuple(target.shape)} here but "
                             f"{tuple(value.shape)} in session {session_id!r}")
    # (1,000 copies or more with the collector paused, as the pull's decoding: optserve._gc)
    with torch.no_grad(), gc_paused(len(result.params)):
        for name, value in result.params.items():
            local[name].copy_(torch.as_tensor(value))
    return result
