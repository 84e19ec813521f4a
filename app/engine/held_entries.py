"""A session's parameters (names, dtypes and shapes, in its order) as its host answers them
for a body's early refusal made in another process: a Ray front refuses a step's, a push's or
an overwrite's body naming more tensors than the session holds from the body's entries, before
its tensors are made, as the embedded engine does in its own process
(:meth:`EmbeddedHost.entries_refusal <app.engine.host.EmbeddedHost.entries_refusal>`), with the
same check (:func:`app.engine.session.refuse_entries`) and so the same answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from app.engine.interface import EntriesOp, EntriesRefusal, HeaderEntries
from app.engine.session import refuse_entries


class ParamShape(NamedTuple):
    """A parameter's dtype and shape (what :func:`refuse_entries` reads of it)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HeldEntries:
    """The parameters of a session as its host held them when asked, for a body of ``op``
    (:meth:`EmbeddedHost.held_entries <app.engine.host.EmbeddedHost.held_entries>`): how many
    (``count``), and their dtypes and shapes by name where the host's own refusal would
    refuse such a body then (``params``; None: it declines, the body is decoded whole)."""

    count: int
    params: dict[str, ParamShape] | None
    op: EntriesOp

    def refusal(self) -> EntriesRefusal | None:
        """The refusal of a body naming more tensors than these: the session's own check
        (:meth:`Session.refuse_entries <app.engine.session.Session.refuse_entries>`) over the
        parameters as they were when the host was asked, which is a moment of the request's
        own (a refusal changes nothing); None where the host declines. A push with ``scalars``
        is decoded whole (the host checks their names against the session's, before the
        gradients)."""
        op, params = self.op, self.params
        if params is None:
            return None
        field = "params" if op == "overwrite" else "grads"
        held = len(params)

        def refuse(entries: HeaderEntries, upcast: bool, scalars: object) -> None:
            refuse_entries(params, ((name, dtype, shape) for name, (dtype, shape, _)
                                    in entries.items()), field,
                           None if op == "overwrite" else upcast)
        return EntriesRefusal(held=lambda: held, refuse=refuse, scalars=op != "push")
