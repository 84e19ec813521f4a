"""The operation model: every mutation of a session is one typed value.

An :class:`Operation` holds its arguments as plain data and tensors, and in one place:

- ``check(session)``: every validation, touching nothing; returns a *plan* for ``apply``;
- ``apply(session, plan)``: the change itself; when it raises, the session is as it was
  (cheap undo of small state), or the op raises :class:`ApplyFailed` and the host restores the
  session from its store;
- ``to_tree()`` / ``from_tree()``: its log record (the arguments, nothing computed).

The write-ahead log is a sequence of these values; replay at start decodes each and runs the
same ``check`` and ``apply`` the live request ran. A remote session host receives the same
values. :data:`REGISTRY` maps each ``kind`` to its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from app.engine import state_order

if TYPE_CHECKING:
    from app.engine.session import Session

REGISTRY: dict[str, type[Operation]] = {}


class ApplyFailed(Exception):
    """``apply`` failed after it had changed tensors it cannot put back cheaply: the host
    restores the session from its store (and cuts the operation's record from the log)."""


@dataclass
class Operation:
    kind: ClassVar[str]
    #: whether a successful apply bumps the session's version (predicted in the log record)
    bumps_version: ClassVar[bool] = False
    def check(self, session: Session) -> Any:
        """Validate against the session as it is; change nothing. Returns the plan."""
        return None

    def apply(self, session: Session, plan: Any) -> Any:
        raise NotImplementedError

    def version_after(self, session: Session, plan: Any) -> int:
        """The version the session will have after ``apply`` (written in the record)."""
        return session.version + (1 if self.bumps_version else 0)

    def to_tree(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Operation:
        raise NotImplementedError

    def revised(self, result: Any) -> bool:
        """Whether this apply (its ``result``) changed the session, which its ``revision``
        counts: everything but what only touches the gradient accumulator (push, zero_grad);
        a step skipped for non-finite gradients only through the option changes sent with
        it."""
        return True

    def replayed(self) -> Operation:
        """This operation as a log replay runs it: without what was checked only when it was
        asked (a conditional import's preconditions, which held then)."""
        return self

    def refusals(self, session: Session) -> list[tuple[str, str, dict[str, Any]]]:
        """Idempotency keys of other requests this operation answered with a refusal (key,
        fingerprint, ``idempotency.refusal``), remembered after its ``apply``, live and at
        replay: the sync pushes whose round it discarded."""
        return []

    def result_json(self, result: Any) -> dict[str, Any]:
        """What a repeated idempotency key is answered with (no tensors)."""
        to_json = getattr(result, "to_json", None) or getattr(result, "scalars", None)
        return dict(to_json()) if to_json is not None else {}


def register(cls: type[Operation]) -> type[Operation]:
    REGISTRY[cls.kind] = cls
    return cls


def decode(kind: str, tree: dict[str, Any]) -> Operation:
    cls = REGISTRY.get(kind)
    if cls is None:
        raise ValueError(f"unknown logged operation {kind!r}")
    return cls.from_tree(tree)


def apply_counted(op: Operation, s: Session, plan: Any) -> Any:
    """``op.apply(s, plan)`` with the session's ``revision`` counting it, live and at replay
    alike. Moved first, so that what the apply answers (a description) shows the session after
    it; put back when the apply raises or changed nothing (:meth:`Operation.revised`)."""
    before = s.revision
    s.revision += 1
    try:
        result = op.apply(s, plan)
    except BaseException:
        s.revision = before
        raise
    if not op.revised(result):
        s.revision = before
    state_order.note_new(s)
    return result
