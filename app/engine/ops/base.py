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

import dataclasses
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from app.engine import state_order
from app.errors import PreconditionFailed
from optserve._precondition import NOTHING_DONE, version_left

if TYPE_CHECKING:
    from app.engine.interface import SessionInfo
    from app.engine.session import Session

REGISTRY: dict[str, type[Operation]] = {}


class ApplyFailed(Exception):
    """``apply`` failed after it had changed tensors it cannot put back cheaply: the host
    restores the session from its store (and cuts the operation's record from the log)."""


#: the most versions of an ``If-Match`` list a 412 names (its ``base_versions`` and detail:
#: the first ones, in the order sent; ``base_versions_count`` says how many it had)
ECHOED_VERSIONS = 16


@dataclass(frozen=True)
class Expected:
    """A conditional request's precondition: the session ``version`` (``If-Match:
    "<version>"`` or ``?base_version=``) and/or ``revision`` (``?base_revision=``) the client
    read. Checked with the operation's own check, under the session's lock, so nothing comes
    between it and the apply; a session no longer there is a 412 ``precondition_failed``, with
    nothing done. Not logged: a replay runs what was applied, whose precondition held then.

    ``If-Match`` compares strongly (RFC 9110 13.1.1): a list (``"4", "5"``) holds at any of
    its versions (:attr:`version` and :attr:`others`); a weak tag (``W/"5"``) matches none, so
    a header of weak tags only (:attr:`weak`, no :attr:`version`) holds at no version."""

    version: int | None = None
    revision: int | None = None
    #: what a refusal of :attr:`version` names: what the request gave it in (``If-Match``, or
    #: the query's ``base_version``)
    version_field: str = "base_version"
    #: the further versions an ``If-Match`` list names (any one of them holds)
    others: tuple[int, ...] = ()
    #: the ``If-Match`` header named weak tags (``W/"5"``), which never match
    weak: bool = False

    @property
    def versions(self) -> tuple[int, ...] | None:
        """The versions at which it holds (empty: none), or None when it names no version."""
        if self.version is None and not self.weak:
            return None
        return ((self.version,) if self.version is not None else ()) + self.others

    def check(self, s: Session | SessionInfo) -> None:
        """412 unless the session (or its description) is at :attr:`version` and
        :attr:`revision`."""
        # (a Session counts its steps in step_count, its description in step)
        step = getattr(s, "step_count", getattr(s, "step", None))
        self.check_at(s.version, s.revision, step=step)

    def check_at(self, version: int, revision: int | None,
                 outcome: str = NOTHING_DONE, *, step: int | None = None) -> None:
        """:meth:`check` against a version and revision read elsewhere (a read's answer,
        which says what ``outcome`` was: ``nothing is answered``; its revision may be
        unknown: None). A refusal names the current version, revision and ``step`` (the
        optimizer steps taken, where known): the 412's version headers
        (:func:`app.api.problems.current_version_headers`)."""
        extra: dict[str, Any] = {} if revision is None else {"current_revision": revision}
        if step is not None:
            extra["current_step"] = step
        versions = self.versions
        if versions is not None and version not in versions:
            if not versions:
                raise PreconditionFailed(
                    f"the session is at version {version}, and {self.version_field} names "
                    "only weak tags (W/\"<version>\"): RFC 9110 compares If-Match strongly, "
                    f"so a weak tag matches no version ({outcome}); send the ETag as "
                    f"answered (\"{version}\")", field=self.version_field,
                    current_version=version, **extra)
            shown = versions[:ECHOED_VERSIONS]
            more = (f" and {len(versions) - len(shown)} more"
                    if len(versions) > len(shown) else "")
            named = (f"not {self.version}" if not self.others
                     else f"at none of {', '.join(str(v) for v in shown)}{more}")
            if self.others:  # (bounded: a list as long as the head allows names 10,000s)
                extra["base_versions"] = list(shown)
                extra["base_versions_count"] = len(versions)
            raise PreconditionFailed(  # (the SDK's own 412 says the same: optserve._stale)
                version_left(version, named, outcome), field=self.version_field,
                current_version=version, base_version=versions[0], **extra)
        if self.revision is not None and self.revision != revision:
            raise PreconditionFailed(
                f"the session is at revision {revision}, not {self.revision}: it changed "
                f"since it was read (a step, an option change, ...; {outcome}); read it "
                "again", field="base_revision", base_revision=self.revision,
                current_version=version, **extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (
            ("version", self.version), ("revision", self.revision),
            ("version_field", self.version_field)) if v is not None}
        if self.others:
            out["others"] = list(self.others)
        if self.weak:
            out["weak"] = True
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Expected | None:
        version, revision = obj.get("version"), obj.get("revision")
        weak = obj.get("weak") is True
        if version is None and revision is None and not weak:
            return None
        return cls(None if version is None else int(version),
                   None if revision is None else int(revision),
                   str(obj.get("version_field", "base_version")),
                   tuple(int(v) for v in obj.get("others") or ()), weak)


@dataclass
class Operation:
    kind: ClassVar[str]
    #: whether a successful apply bumps the session's version (predicted in the log record)
    bumps_version: ClassVar[bool] = False
    _: KW_ONLY
    #: a conditional request's precondition (None: unconditional). Set by the request, checked
    #: before ``check`` (:meth:`checked`), carried to a remote host (:func:`wire_tree`), never
    #: logged (:meth:`replayed` drops it)
    expected: Expected | None = None

    def checked(self, session: Session) -> Any:
        """The precondition (:attr:`expected`), then :meth:`check`: what a live request runs."""
        if self.expected is not None:
            self.expected.check(session)
        return self.check(session)

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

    def changes(self, session: Session, plan: Any) -> bool:
        """Whether applying ``plan`` is a change at all, known before the apply: one that
        leaves every value as it is (a ``PATCH`` of ``{}``, or of the values the session
        holds) is no revision (:func:`apply_counted`)."""
        return True

    def revised(self, result: Any) -> bool:
        """Whether this apply (its ``result``) changed the session, which its ``revision``
        counts: everything but what only touches the gradient accumulator (push, zero_grad);
        a step skipped for non-finite gradients only through the option changes sent with
        it."""
        return True

    def replayed(self) -> Operation:
        """This operation as a log replay runs it: without what was checked only when it was
        asked (a conditional request's precondition, which held then)."""
        return dataclasses.replace(self, expected=None) if self.expected is not None else self

    def expecting(self, other: Operation) -> Operation:
        """This operation with ``other``'s precondition (a shard's part of a session's)."""
        if other.expected is None or self.expected == other.expected:
            return self
        return dataclasses.replace(self, expected=other.expected)

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
    op = cls.from_tree(tree)
    expected = tree.get(EXPECTED_KEY)
    if isinstance(expected, dict):
        op.expected = Expected.from_json(expected)
    return op


#: where :func:`wire_tree` puts an operation's precondition (no operation has an argument of
#: this name)
EXPECTED_KEY = "$expected"


def wire_tree(op: Operation) -> dict[str, Any]:
    """An operation as it travels to a remote host: its log record's tree, and its
    precondition (:func:`decode` reads both)."""
    tree = op.to_tree()
    if op.expected is not None:
        tree = {**tree, EXPECTED_KEY: op.expected.to_json()}
    return tree


def apply_counted(op: Operation, s: Session, plan: Any) -> Any:
    """``op.apply(s, plan)`` with the session's ``revision`` counting it, live and at replay
    alike. Moved first, so that what the apply answers (a description) shows the session after
    it; put back when the apply raises or changed nothing (:meth:`Operation.revised`); not
    moved at all for an apply that changes no value (:meth:`Operation.changes`)."""
    before = s.revision
    if op.changes(s, plan):
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
