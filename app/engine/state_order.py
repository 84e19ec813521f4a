"""The order of an optimizer's per-parameter states, which torch's ``state_dict()`` follows.

torch keeps ``optimizer.state`` in the order its entries were made: a state import's order
(``load_state_dict``), then each step's new entries in the order of the param groups'
parameters (and Adagrad's, made at construction, in that order). A sharded session's export
must list its entries as the unsharded session's does, but each shard sees only its own:
a shard therefore stamps each entry with the session's version when it was made and its place
among the entries made then (its position in the imported state for an import, none for a
step: the session's order of parameters then decides), and the coordinator sorts every
shard's entries by these stamps (:func:`app.engine.shards.merge_state`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine.session import Session

#: the place of an entry a step (or the optimizer's constructor) made: after nothing else made
#: at its version, it is ordered by the session's order of parameters
MADE_BY_STEP = -1


def note_new(s: Session) -> None:
    """Stamp the entries torch made since the last stamp (a step's, Adagrad's at construction)
    with the session's version. Only shards keep stamps (``s.state_order`` is None else); a
    state's entries are never removed but by an import, which stamps them all itself."""
    order = s.state_order
    if order is None or len(order) == len(s.optimizer.state):
        return
    names = {id(p): n for n, p in s.params.items()}
    for p in s.optimizer.state:
        name = names[id(p)]
        if name not in order:
            order[name] = (s.version, MADE_BY_STEP)


def note_import(s: Session, names: list[str], ranks: list[int] | None) -> None:
    """Stamp an import's entries (``names``, in the state's order) at the session's version:
    by ``ranks``, their positions in the whole session's state (a shard's part), else by their
    own order."""
    if s.state_order is None:
        return
    places = ranks if ranks is not None else list(range(len(names)))
    s.state_order = {n: (s.version, int(r)) for n, r in zip(names, places, strict=True)}


def to_json(order: dict[str, tuple[int, int]] | None) -> dict[str, list[int]] | None:
    return None if order is None else {n: [v, r] for n, (v, r) in order.items()}


def from_json(obj: Any) -> dict[str, tuple[int, int]] | None:
    if obj is None:
        return None
    return {str(n): (int(v[0]), int(v[1])) for n, v in obj.items()}
