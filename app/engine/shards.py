"""Sharded sessions: one optimizer session split by parameter over several hosts.

``"shards": S`` on create assigns each parameter to one of S **shards** (largest first, each
to the least loaded shard so far: balanced by bytes). A shard is an ordinary session on some
host, holding its parameters in every param group of the session (a group may be empty on a
shard), the same optimizer options, scheduler and policies. Every torch optimizer this service
runs (not LBFGS) updates each parameter on its own, so S shards stepped with their parts of the
gradients hold bitwise what the unsharded session would; every shard steps (and so steps its
scheduler) at every step, so versions, step counts and learning rates stay equal.

:class:`ShardedSession` is the session's coordinator. It orders the session's operations
(one at a time) and runs each as a **two-phase** operation over the shards it concerns:

1. *prepare*, on every shard in parallel: the operation's own ``check`` against the shard's
   session (nothing changes). Any refusal aborts the operation on every shard: nothing was
   applied anywhere, and the client gets the refusal (a 4xx). A step's non-finite gradients
   are decided here for the whole session: one shard finding them under ``nonfinite: skip``
   turns the step into a ``skip_step`` on every shard.
2. *commit*, on every shard in parallel: the shard logs and applies the operation under the
   operation's idempotency key (the client's ``Idempotency-Key``, or a fresh one). A commit
   can no longer be refused (the check passed and nothing else changes a shard: only its
   coordinator sends it operations); it can only fail to arrive, e.g. a shard host dying
   between the phases or in the middle of its commit. The coordinator then **rolls forward**:
   it sends the operation again (same key) until the shard's host is back (Ray restarts it
   and it restores from storage); a shard that had logged it answers from its idempotency
   table, one that had not applies it. Past ``commit_timeout_s`` the client gets 503
   ``host_restarting``; the operation stays pending and completes before the session's next
   one, and the client's retry (same ``Idempotency-Key``) gets its answer.

If the coordinator itself dies between the phases, a client retry with the same key finishes
the operation the same way (prepare finds it applied on some shards, the commit applies it on
the rest). Until that retry comes, the shards disagree on their version, and every other
operation and read is refused with a retryable 503 ``shards_out_of_step`` (another client's
operation may well arrive first). A disagreement that outlasts the grace (twice
``commit_timeout_s``: the client never retried) takes the session out of service: every
operation but delete gets 503 ``session_damaged``, without ``Retry-After`` (nothing brings it
back; delete it). So does a commit a shard refuses for good. A shard that storage faults took
out of service (503 ``session_damaged`` with a ``Retry-After``: its host restores it from its
store once the disk works, ``EmbeddedHost._healed``) is rolled forward like a host that
restarts: restored without the operation, it applies it at the commit's next try; a prepare
that meets it is refused with that 503 and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from app.engine import creation_tokens, metrics, ps, sparse, state_dicts, state_order
from app.engine.history import HistoryQuery, HistoryResult
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
    EntriesOp,
    EntriesRefusal,
    GradsResult,
    GroupSpec,
    IdemKey,
    ParamsResult,
    ReturnParams,
    SchedulerResult,
    SessionInfo,
    StateExport,
    StepResult,
    Tensors,
    no_session,
    split_key,
)
from app.engine.ops import (
    AddParamGroup,
    Bump,
    Configure,
    Expected,
    ImportState,
    Operation,
    Overwrite,
    Push,
    SchedulerStep,
    SkipStep,
    Step,
    UpdateParamGroup,
    ZeroGrad,
)
from app.errors import Invalid, NotFound, OptserveError, StorageFull, Unavailable
from app.wire.dtypes import TORCH_DTYPES
from app.wire.safetensors_body import PackedTensors, pack

if TYPE_CHECKING:
    from app.engine.router import Checked, Host

T = TypeVar("T")
MAX_SHARDS = 64
MAX_WAIT_S = ps.MAX_WAIT_S
log = logging.getLogger("optserve.shards")


# ---------------------------------------------------------------------------- keys and layout
def shard_key(key: str, index: int, shards: int) -> str:
    """The host key of a shard: ``<tenant>#<id>~shard<i>of<S>``. No tenant lists it (tenants
    have no ``#``), and it is a valid key and directory name."""
    tenant, session_id = split_key(key)
    return f"{tenant}#{session_id}~shard{index}of{shards}"


def parent_of(key: str) -> str | None:
    """The session key of a shard key, or None for a key that is not a shard's."""
    tenant, _, rest = key.partition("~")
    owner, sep, session_id = tenant.partition("#")
    if not sep:
        return None
    return f"{owner}~{session_id}"


def shown_id(key: str) -> str:
    """The id clients name the session of ``key`` by (a shard key's: its sharded session's)."""
    return split_key(parent_of(key) or key)[1]


def shard_index(key: str) -> int | None:
    """The index of a shard key's shard, or None for a key that is not a shard's."""
    if parent_of(key) is None:
        return None
    return int(key.rpartition("~shard")[2].partition("of")[0])


@dataclass
class ShardLayout:
    """Which shard holds each parameter, and the session's own order of parameters (torch's
    state-dict ids follow it)."""

    shards: int
    #: every group's parameter names, in the session's order
    groups: list[list[str]]
    #: parameter name -> shard index
    owner: dict[str, int]

    def names(self) -> list[str]:
        return [n for g in self.groups for n in g]

    def names_of(self, index: int) -> list[str]:
        return [n for n in self.names() if self.owner[n] == index]

    def part(self, tensors: dict[str, T], index: int) -> dict[str, T]:
        return {n: t for n, t in tensors.items() if self.owner.get(n) == index}

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "groups": self.groups, "owner": self.owner}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardLayout:
        return cls(int(obj["shards"]), [list(g) for g in obj["groups"]],
                   {str(k): int(v) for k, v in obj["owner"].items()})


def check_shards(value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SHARDS:
        raise Invalid(f"shards must be an integer from 1 to {MAX_SHARDS}", code="invalid_body",
                      field="shards")
    return value


def check_shardable(spec: CreateSpec) -> None:
    """LBFGS is not split: its direction and line search take every parameter's gradient
    together, and it steps through evaluations, which only an unsharded session offers (a
    sharded LBFGS session was made, and every step of it refused)."""
    if spec.shards > 1 and spec.optimizer == "LBFGS":
        raise Invalid("LBFGS cannot be sharded: its step takes every parameter's gradient "
                      "together (and asks for evaluations); create it with one shard",
                      code="not_supported", field="shards")


def plan_layout(groups: list[GroupSpec], shards: int) -> ShardLayout:
    """Assign parameters to shards: largest first (ties by name), each to the shard with the
    fewest bytes so far (ties: the lowest index)."""
    sizes: dict[str, int] = {}
    for g in groups:
        for name, t in g.params.items():
            sizes[name] = t.numel() * t.element_size()
    if shards > len(sizes):
        raise Invalid(f"{shards} shards for {len(sizes)} parameters: every shard needs at least "
                      "one parameter", code="invalid_body", field="shards")
    load = [0] * shards
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        index = min(range(shards), key=lambda i: (load[i], i))
        owner[name] = index
        load[index] += sizes[name]
    return ShardLayout(shards, [list(g.params) for g in groups], owner)


def shard_spec(spec: CreateSpec, layout: ShardLayout, index: int) -> CreateSpec:
    """The create of one shard: its parameters in every group (some perhaps empty)."""
    groups = [GroupSpec(layout.part(g.params, index), dict(g.options)) for g in spec.groups]
    return dataclasses.replace(spec, groups=groups, id=None, shards=1, empty_groups=True)


# ---------------------------------------------------------------------------- merging
def merge_info(key: str, infos: list[SessionInfo], layout: ShardLayout,
               hosts: list[str]) -> SessionInfo:
    base = infos[0]
    groups = [{**g, "params": list(layout.groups[i])} for i, g in enumerate(base.param_groups)]
    params: dict[str, dict[str, Any]] = {}
    for name in layout.names():
        params[name] = infos[layout.owner[name]].params[name]
    accumulated = sorted({n for info in infos for n in info.accumulated})
    devices = sorted({info.device for info in infos})
    shards = [{"host": host, "device": info.device, "params": layout.names_of(i)}
              for i, (host, info) in enumerate(zip(hosts, infos, strict=True))]
    return dataclasses.replace(
        base, id=split_key(key)[1], device=devices[0] if len(devices) == 1 else ",".join(devices),
        param_groups=groups, params=params, accumulated=accumulated,
        replayed=all(info.replayed for info in infos),
        token=creation_tokens.joined([info.token for info in infos]),
        placement={**(base.placement or {}), "shards": shards})


def merge_params(parts: Sequence[Tensors | None], layout: ShardLayout,
                 names: list[str] | None = None) -> PackedTensors:
    """One packed buffer of the shards' parameters, in the session's order (one copy)."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        if part:
            merged.update(part)
    order = names if names is not None else layout.names()
    return pack({n: merged[n] for n in order if n in merged})


def merge_touched(parts: Sequence[Tensors | None], layout: ShardLayout) -> Tensors:
    """A ``?return=touched`` step's answer from its shards' (each the rows, or whole
    parameters, its step touched): in the session's order, as the unsharded session answers
    them; not packed (rows travel as row-sparse tensors)."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        if part:
            merged.update(part)
    return {n: merged[n] for n in layout.names() if n in merged}


def merge_state(sds: list[dict[str, Any]], layout: ShardLayout,
                orders: Sequence[dict[str, tuple[int, int]] | None] | None = None
                ) -> dict[str, Any]:
    """The shards' state dicts as the unsharded session's (torch's format: ids in the
    session's order of parameters; the states in the order torch made them, by the shards'
    stamps in ``orders``: :mod:`app.engine.state_order`)."""
    gid = {name: i for i, name in enumerate(layout.names())}
    ranked: list[tuple[tuple[int, int], int, Any]] = []
    for i, sd in enumerate(sds):
        order = (orders[i] if orders is not None else None) or {}
        for group in sd["param_groups"]:
            for local, name in zip(group["params"], group["param_names"], strict=True):
                entry = sd["state"].get(local)
                if entry is None:
                    continue
                made, place = order.get(name, (-1, state_order.MADE_BY_STEP))
                ranked.append(((made, gid[name] if place == state_order.MADE_BY_STEP
                                else place), gid[name], entry))
    state = {pid: entry for _, pid, entry in sorted(ranked, key=lambda r: (r[0], r[1]))}
    groups = []
    for i, group in enumerate(sds[0]["param_groups"]):
        names = layout.groups[i]
        whole = {"params": [gid[n] for n in names], "param_names": list(names)}
        groups.append({k: whole.get(k, v) for k, v in group.items()})  # (in torch's order)
    out: dict[str, Any] = {"state": state, "param_groups": groups}
    if "scheduler" in sds[0]:
        out["scheduler"] = sds[0]["scheduler"]
    return out


def split_state(state: dict[str, Any], layout: ShardLayout
                ) -> list[tuple[dict[str, Any], list[int]]]:
    """A whole-session state dict (torch's format) as each shard's, with the position in the
    session's state of each of the part's entries (:class:`ImportState`'s ``ranks``):
    parameters by position, as the unsharded import takes them, each part's entries in the
    session's order, empty ones (``{}``) too, as torch keeps them. Structure errors are the
    unsharded session's own."""
    if not isinstance(state, dict):
        raise Invalid("a state dict must be an object with state and param_groups",
                      code="state_mismatch", field="state_dict")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(layout.groups):
        have = len(groups) if isinstance(groups, list) else "no"
        raise Invalid(f"the state has {have} param groups; this session has "
                      f"{len(layout.groups)}", code="state_mismatch",
                      field="state_dict.param_groups")
    name_of: dict[int, str] = {}
    for i, (g, names) in enumerate(zip(groups, layout.groups, strict=True)):
        ids = state_dicts.group_ids(g, i, len(names))
        for pid, name in zip(ids, names, strict=True):
            if pid in name_of:
                raise Invalid("a parameter id appears twice in param_groups",
                              code="state_mismatch", field="state_dict.param_groups")
            name_of[pid] = name
    raw_state = state.get("state", {})
    if not isinstance(raw_state, dict):
        raise Invalid("state must be an object of per-parameter states", code="state_mismatch",
                      field="state_dict.state")
    by_name: dict[str, Any] = {}
    for key, entry in raw_state.items():
        # (read as the unsharded import reads it: int() took " 0", "+0", "١", True and 1.0)
        pid = state_dicts.state_id(key, f"state_dict.state.{key}")
        if pid not in name_of:
            raise Invalid(f"state for parameter id {pid}, which no param group lists",
                          code="state_mismatch", field=f"state_dict.state.{key}")
        if name_of[pid] in by_name:  # ("0" and "00": one would be dropped)
            raise Invalid(f"two states for parameter id {pid}", code="state_mismatch",
                          field=f"state_dict.state.{key}")
        by_name[name_of[pid]] = entry
    place = {n: i for i, n in enumerate(by_name)}
    out = []
    for index in range(layout.shards):
        local = {n: i for i, n in enumerate(layout.names_of(index))}
        shard_groups = []
        for g, names in zip(groups, layout.groups, strict=True):
            mine = [n for n in names if layout.owner[n] == index]
            shard_groups.append({**{k: v for k, v in g.items()
                                    if k not in ("params", "param_names")},
                                 "params": [local[n] for n in mine], "param_names": mine})
        mine_state = [(n, e) for n, e in by_name.items() if layout.owner[n] == index]
        sd: dict[str, Any] = {"state": {local[n]: e for n, e in mine_state},
                              "param_groups": shard_groups}
        for k, v in state.items():
            if k not in ("state", "param_groups"):
                sd[k] = v  # the scheduler (and anything unknown, which every shard refuses)
        out.append((sd, [place[n] for n, _ in mine_state]))
    return out


def import_refusal(exc: BaseException, index: int, state: dict[str, Any],
                   layout: ShardLayout) -> BaseException:
    """A shard's refusal of its part of an imported state, in the session's terms: the shard
    numbers its own parameters from 0 (:func:`split_state`), the client's state numbers the
    session's; the parameter ids its ``field`` and ``detail`` name become the client's."""
    if not isinstance(exc, OptserveError):
        return exc
    client: dict[str, int] = {}
    for i, (g, names) in enumerate(zip(state["param_groups"], layout.groups, strict=True)):
        client.update(zip(names, state_dicts.group_ids(g, i, len(names)), strict=True))
    ids = {local: client[n] for local, n in enumerate(layout.names_of(index))}

    def own(m: re.Match[str]) -> str:
        local = int(m[2])
        return f"{m[1]}{ids[local]}" if local in ids else m[0]

    if exc.field is not None:
        exc.field = re.sub(r"^(state_dict\.state\.)(\d+)(?=\.|$)", own, exc.field)
    exc.detail = re.sub(r"(parameter id )(\d+)", own, exc.detail)
    exc.args = (exc.detail,)
    return exc


# ---------------------------------------------------------------------------- errors
#: a shard's tip (:meth:`EmbeddedHost.cut_tip <app.engine.host.EmbeddedHost.cut_tip>`): its
#: version, its revision, and the key of its latest operation (None: none kept)
Tip = tuple[int, int, str | None]


#: a shard's revision as restored (:meth:`EmbeddedHost.revision_tip
#: <app.engine.host.EmbeddedHost.revision_tip>`): its version, its revision, and whether that
#: revision is unknown (restored from a snapshot written before revisions were counted)
RevisionTip = tuple[int, int, bool]


def old_revisions_aligned(tips: Sequence[RevisionTip]) -> int | None:
    """The revision a sharded session's shards (``tips``, one per shard) are put at where some
    were restored from snapshots written before revisions were counted: such a snapshot holds
    none, so that shard counted only what it logged after it, while a shard restored from its
    log alone counted every change; apart, the session was left out of the listing and
    answered 503 ``shards_out_of_step`` until it went out of service. Only where the shards
    agree on their version (a step a crash cut between them is :meth:`ShardedSession.undo_cut`'s)
    and some revision is unknown; their highest revision (a revision is a change counter, and no
    server from before them gave a client one). None: nothing to align."""
    if not any(unknown for _, _, unknown in tips):
        return None
    if len({v for v, _, _ in tips}) > 1 or len({r for _, r, _ in tips}) <= 1:
        return None
    return max(r for _, r, _ in tips)


def cut_candidates(tips: Sequence[Tip]) -> list[tuple[str, list[int], tuple[int, int]]]:
    """Where a sharded session's shards disagree (``tips``, one per shard) because an
    operation a crash cut between their commits reached some of them only: at different
    versions or revisions, or (an operation that moves neither: a push, ``zero_grad``) with
    different latest operations. For each key that is the latest operation of some shards,
    those shards and the version and revision every other shard agrees at (which undoing it
    there must give). The caller checks that the other shards never saw the key (else the
    operation is what they did, and the shards apart for another reason), and undoes it
    where the shards' logs allow (:meth:`ShardedSession.undo_cut`: at the embedded engine's
    start, and by a Ray coordinator made anew)."""
    if len(set(tips)) <= 1:
        return []
    found = []
    for tx in sorted({t[2] for t in tips if t[2] is not None}):
        cut = [i for i, t in enumerate(tips) if t[2] == tx]
        rest = {(t[0], t[1]) for i, t in enumerate(tips) if i not in cut}
        if len(rest) == 1:
            found.append((tx, cut, rest.pop()))
    return found


def history_refused() -> Invalid:
    """422 ``not_supported_here`` for ``GET .../history`` of a sharded session: each shard
    records the norms of its own part of the parameters, and norms merged from them (as a
    step's answer merges its ``metrics``) equal the unsharded session's only within float
    rounding, not bit for bit as a history row is."""
    return Invalid("history: not offered for a sharded session (each shard records the "
                   "norms of its own part of the parameters; a step's answer carries the "
                   "session's metrics, merged)", code="not_supported_here", field="history")


def scalars_refused() -> Invalid:
    """422 ``not_supported_here`` for a sharded session's step or push carrying client
    scalars: they are recorded in the session's history, which a sharded session does not
    offer (:func:`history_refused`)."""
    return Invalid("scalars: not offered for a sharded session (a step's scalars are "
                   "recorded in its history, which a sharded session does not offer)",
                   code="not_supported_here", field="scalars")


def retryable(exc: BaseException) -> bool:
    """A failure to reach a shard (its host restarting, its disk), or a shard that storage
    faults took out of service and its host restores from its store once the disk works
    (``session_damaged`` with a ``retry_after``); not a refusal, nor a shard that nothing
    restores (``session_damaged`` without one)."""
    if isinstance(exc, Unavailable) and exc.code == "session_damaged":
        return exc.retry_after is not None
    return isinstance(exc, (Unavailable, StorageFull))


def first_refusal(errors: dict[int, BaseException], layout: ShardLayout) -> BaseException:
    """The error a client gets when some shards refused: a refusal (4xx) before an outage,
    non-finite gradients of every shard as one error, else the lowest shard's."""
    refusals = {i: e for i, e in errors.items()
                if isinstance(e, OptserveError) and 400 <= e.status < 500}
    if refusals:
        nonfinite = [e for e in refusals.values() if isinstance(e, Invalid)
                     and e.code == "nonfinite_gradient"]
        if len(nonfinite) == len(refusals) and len(nonfinite) > 1:
            bad = [n for n in layout.names()
                   if any(n in e.extra.get("names", []) for e in nonfinite)]
            return Invalid(f"non-finite gradient values in {', '.join(map(repr, bad[:20]))}; "
                           "this session rejects them (nonfinite: reject)",
                           code="nonfinite_gradient", field=f"grads.{bad[0]}", names=bad)
        return refusals[min(refusals)]
    return errors[min(errors)]


@dataclass
class _Pending:
    """A committed operation some shards have not applied yet (rolled forward later)."""

    ops: dict[int, Operation]
    idem: IdemKey


# ---------------------------------------------------------------------------- the coordinator
class ShardedSession:
    """The coordinator of one sharded session (see the module docstring). It implements the
    host methods the front calls for the session's key."""

    def __init__(self, key: str, layout: ShardLayout, shards: list[tuple[Host, str]], *,
                 commit_timeout_s: float = 30.0) -> None:
        self.key = key
        self.layout = layout
        self.shards = shards
        self.name = "sharded"
        self.device = shards[0][0].device
        self.commit_timeout_s = commit_timeout_s
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._version: int | None = None
        self._pending: _Pending | None = None
        self._damaged: str | None = None
        #: since when the shards have disagreed on their version (None: they agree)
        self._out_of_step_since: float | None = None
        #: the server is draining (:meth:`drain`): long polls answer at once
        self._draining = False
        #: a coordinator made anew puts its shards in step before it serves them
        #: (:meth:`settle`); True while that is still to be done: a failure to reach a shard
        #: that passes (its host restarting) leaves it due, tried again by every later call
        self._settle_due = False
        #: shape-only stand-ins of the parameters, for the checks of row pulls (described at
        #: the first one: nothing changes a parameter's shape or dtype)
        self._shapes: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ create and delete
    @classmethod
    async def create(cls, key: str, spec: CreateSpec, layout: ShardLayout,
                     shards: list[tuple[Host, str]], *, idem: IdemKey | None = None,
                     commit_timeout_s: float = 30.0, made: frozenset[int] | set[int] = frozenset(),
                     alone: contextlib.AbstractAsyncContextManager[Any] | None = None,
                     ) -> tuple[ShardedSession, SessionInfo]:
        """Create every shard, or none: a shard refusing the create deletes the others it made
        (``made``: the shards an earlier try of this keyed create made, which answer it and
        are kept). ``alone``: held while the shards' hosts are asked (the Ray engine's tries
        of one keyed create through several fronts ask them one after the other, so that one
        answers as the original: :meth:`RayRouter._alone <app.engine.ray_host.RayRouter.
        _alone>`)."""
        if spec.ps_options.get("sync") is not None:
            raise Invalid("a sharded session steps without synchronous rounds (a round's "
                          "reduction would have to gather every shard's gradients in one "
                          "place); use max_staleness, or one shard", code="invalid_body",
                          field="sync")
        async with alone or contextlib.nullcontext():
            results = await asyncio.gather(
                *(host.create(skey, shard_spec(spec, layout, i), idem=idem)
                  for i, (host, skey) in enumerate(shards)), return_exceptions=True)
            errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
            if errors:
                await asyncio.gather(*(host.delete(skey) for i, (host, skey)
                                       in enumerate(shards) if i not in errors and i not in made),
                                     return_exceptions=True)
                raise first_refusal(errors, layout)
        infos = [r for r in results if isinstance(r, SessionInfo)]
        session = cls(key, layout, shards, commit_timeout_s=commit_timeout_s)
        session._version = infos[0].version
        return session, merge_info(key, infos, layout, [h.name for h, _ in shards])

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        async with self._lock:
            if expected is not None:  # (held by every shard, read before any is deleted)
                self._check_usable()
                await self._settled()
                infos = await self._all(lambda host, skey: host.describe(skey))
                self._check_lockstep(infos)
                expected.check(merge_info(self.key, infos, self.layout,
                                          [h.name for h, _ in self.shards]))
            results = await asyncio.gather(*(host.delete(skey, idem=idem)
                                             for host, skey in self.shards),
                                           return_exceptions=True)
            errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)
                      and not isinstance(r, NotFound)}
            if errors:
                raise first_refusal(errors, self.layout)
            if idem is None and all(isinstance(r, NotFound) for r in results):
                # (deleted by another delete while this one waited for the lock: its 204 is
                # that delete's; a keyed retry is answered by the shards' tombstones above)
                raise no_session(self.key)
            self._damaged = "the session was deleted"
        self._wake()
        return bool(results) and all(r is True for r in results)

    def refuse_stale(self, expected: Expected, idem_key: str | None) -> None:
        """The 412 of a change's precondition that can no longer hold, from its request's
        head (it was read whole first), where every shard is in this process's host (the
        embedded engine: :meth:`Front.refuse_stale <app.engine.front.Front.refuse_stale>`):
        the problem the operation would give, its lowest shard's refusal
        (:func:`first_refusal`), which is the same check on shard 0 as a plain session's
        (:meth:`EmbeddedHost.refuse_stale <app.engine.host.EmbeddedHost.refuse_stale>`).
        Only while the session is settled: in service, put in step, nothing pending or under
        way (its lock free), every shard settled (:meth:`EmbeddedHost.settled_session
        <app.engine.host.EmbeddedHost.settled_session>`: no operation under way or not yet
        durable, the idempotency key not held) and all at one version and revision (a
        crash's cut operation, undone by :meth:`settle`, may move a shard back), the one
        this coordinator last answered. Anything else is checked after the body as before."""
        from app.engine.router import InProcessHost
        if (self._damaged is not None or self._settle_due or self._pending is not None
                or self._lock.locked()):
            return
        hosts = {id(host.embedded) if isinstance(host, InProcessHost) else None
                 for host, _ in self.shards}
        first = self.shards[0][0]
        if hosts != {id(getattr(first, "embedded", None))} or not isinstance(first,
                                                                             InProcessHost):
            return
        embedded = first.embedded
        at = set()
        for _, skey in self.shards:
            shard = embedded.settled_session(skey, idem_key)
            if shard is None:
                return
            at.add((shard.version, shard.revision))
        if len(at) != 1 or (self._version is not None and next(iter(at))[0] != self._version):
            return
        embedded.refuse_stale(self.shards[0][1], expected, idem_key)

    async def settle(self) -> None:
        """Put the shards in step, as a coordinator made anew does before it serves them (a
        Ray host's, :meth:`HostActor._coordinator <app.engine.ray_host.HostActor.
        _coordinator>`): :meth:`align_old_revisions`, then :meth:`undo_cut`. A failure that
        passes (a shard's host restarting: :func:`retryable`) leaves it due, and every later
        call of the session tries it again before it is served (and answers that failure's
        503 while it fails): it was logged and left, and the session answered 503
        ``shards_out_of_step`` until its coordinator's host restarted (out of service for
        good after twice ``commit_timeout_s``). A shard missing (a create cut part way) or a
        failure that does not pass leaves the session as it is, logged."""
        async with self._lock:
            self._settle_due = True
            try:
                await self._settle()
            except Exception as exc:  # noqa: BLE001 - logged; the calls see it (or not)
                log.warning("sharded session %s: could not put its shards in step%s: %s",
                            self.key, " (tried again at its next call)"
                            if self._settle_due else "", exc)

    async def _settle(self) -> None:
        """:meth:`settle` under the session's lock: raises a failure that passes (still due);
        any other is logged, and the rest done (due no more)."""
        async def align() -> None:
            aligned = await self._align_old_revisions()
            if aligned is not None:
                log.warning("sharded session %s: shards restored from snapshots older than "
                            "revisions put at revision %d", self.key, aligned)

        async def undo() -> None:
            if await self._undo_cut():
                log.warning("sharded session %s: an operation a crash cut between its shards "
                            "was undone", self.key)
        for work, what in ((align, "align the revisions of"), (undo, "undo the operation a "
                                                                      "crash cut between")):
            try:
                await work()
            except NotFound:
                pass  # (a shard missing: a create cut part way, RayRouter._undo_part_made)
            except Exception as exc:
                if retryable(exc):
                    raise
                # (as it was: apart, 503 shards_out_of_step, for an operation's keyed retry)
                log.warning("sharded session %s: could not %s its shards: %s", self.key,
                            what, exc)
        self._settle_due = False

    async def _settled(self) -> None:
        """Under the session's lock, before a call is served: :meth:`settle` again while it is
        due (its failure the call's answer, a retryable 503)."""
        if self._settle_due:
            await self._settle()

    async def align_old_revisions(self) -> int | None:
        """Put the shards at one revision where some were restored from snapshots written
        before revisions were counted (:func:`old_revisions_aligned`: only where they agree on
        their version), run by a coordinator made anew, before :meth:`undo_cut`, as the
        embedded engine's start does (:meth:`EmbeddedHost.align_old_revisions
        <app.engine.host.EmbeddedHost.align_old_revisions>`) for shards on hosts of their own:
        each shard's host says its tip, and the shards below the revision taken are put at it
        (and snapshotted there: :meth:`EmbeddedHost.put_at_revision
        <app.engine.host.EmbeddedHost.put_at_revision>`). The revision aligned, if any."""
        async with self._lock:
            return await self._align_old_revisions()

    async def _align_old_revisions(self) -> int | None:
        """:meth:`align_old_revisions` under the session's lock. A shard that cannot be put
        (its host restarting) raises that failure once the others asked are done; the next
        try (:meth:`settle`, before the session is served) takes the same revision (shards
        only move up to the highest) and puts the rest there. A shard put is snapshotted at
        its revision (known from then on), so the shards whose revision is known are put
        first and those restored from old snapshots last: one still marked as restored from
        one stays while others are below, which the rule needs to align them."""
        tips = await self._all(lambda host, skey: host.revision_tip(skey))
        top = old_revisions_aligned(tips)
        if top is None:
            return None
        for unknown in (False, True):
            moved = [(host, skey) for (host, skey), tip in zip(self.shards, tips, strict=True)
                     if tip[1] != top and tip[2] == unknown]
            results = await asyncio.gather(*(host.put_at_revision(skey, top)
                                             for host, skey in moved), return_exceptions=True)
            errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
            if errors:
                raise first_refusal(errors, self.layout)
        self._out_of_step_since = None
        return top

    async def undo_cut(self) -> list[int]:
        """Make the session whole again where an operation a crash cut between its shards'
        commits reached some of them only (:func:`cut_candidates`), run by a coordinator made
        anew (its host started again, its operations' commits gone with the one before): the
        shards that took it are restored without it (:meth:`EmbeddedHost.undo_last
        <app.engine.host.EmbeddedHost.undo_last>`); the embedded engine's start runs it too
        (:meth:`LocalRouter._undo_cut_operation <app.engine.router.LocalRouter.
        _undo_cut_operation>`). It was
        never acknowledged; left apart, the session answered 503 ``shards_out_of_step`` until
        its keyed retry completed it, and went out of service for good without one. The
        shards undone (none where the shards agree, or that does not make them agree)."""
        async with self._lock:
            return await self._undo_cut()

    async def _undo_cut(self) -> list[int]:
        # (each shard's version, revision and latest key: cheap, no log read)
        tips = await self._all(lambda host, skey: host.cut_tip(skey))
        for tx, cut, want in cut_candidates(tips):
            seen = await asyncio.gather(*(host.holds_key(skey, tx)
                                          for i, (host, skey) in enumerate(self.shards)
                                          if i not in cut))
            if any(seen):
                continue
            done = [i for i in cut
                    if await self.shards[i][0].undo_last(self.shards[i][1], tx, want)]
            self._out_of_step_since = None
            return done
        return []

    # ------------------------------------------------------------------ reads
    async def describe(self, key: str, *, lockstep: bool = True) -> SessionInfo:
        """``lockstep=False``: also while the shards are at different versions (the first
        shard's then), for what only the layout matters to: sizing a ``torch.save`` import,
        whose retry is what completes an import that reached some shards only."""
        async with self._lock:
            self._check_usable()
            await self._settled()
            infos = await self._all(lambda host, skey: host.describe(skey))
        if lockstep:
            self._check_lockstep(infos)
        return merge_info(self.key, infos, self.layout, [h.name for h, _ in self.shards])

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        return [await self.describe(self.key)] if self.key.startswith(prefix) else []

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """``params_dtype``: narrowed by each shard as an unsharded session narrows them
        (the same code: :meth:`Session.pack_params <app.engine.session.Session.pack_params>`),
        packed again in the session's order."""
        if names is not None:
            for n in names:
                if n not in self.layout.owner:
                    raise Invalid(f"unknown parameter {n!r:.80}", code="unknown_parameter",
                                  field=f"names.{n}")
        await self._wait_for(min_version, wait_s)
        async with self._lock:
            self._check_usable()
            await self._settled()
            wanted = names if names is not None else self.layout.names()
            parts = [(i, [n for n in wanted if self.layout.owner[n] == i])
                     for i in range(self.layout.shards)]
            asked = [(i, ns) for i, ns in parts if ns] or [(0, [])]
            results = await asyncio.gather(
                *(self.shards[i][0].pull(self.shards[i][1], ns, unless_versions=unless_versions,
                                         params_dtype=params_dtype)
                  for i, ns in asked), return_exceptions=True)
        first = self._answered([i for i, _ in asked], results)
        if first.not_modified:
            return ParamsResult(first.version, first.step, first.lr, {}, not_modified=True)
        outs = [r for r in results if isinstance(r, ParamsResult)]
        return ParamsResult(first.version, first.step, first.lr,
                            merge_params([r.params for r in outs], self.layout, wanted))

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """Rows of parameters, each from its shard (in the order asked, as an unsharded
        session answers them). The coordinator checks them as that session would, against
        the whole session's parameters (their shapes, described once: a sharded session's
        parameters keep their shapes), before it waits; each shard then gathers its rows."""
        await self._check_rows(rows)
        await self._wait_for(min_version, wait_s)
        async with self._lock:
            self._check_usable()
            await self._settled()
            parts = [(i, {n: idx for n, idx in rows.items() if self.layout.owner[n] == i})
                     for i in range(self.layout.shards)]
            asked = [(i, part) for i, part in parts if part]
            results = await asyncio.gather(
                *(self.shards[i][0].pull_rows(self.shards[i][1], part,
                                              unless_versions=unless_versions,
                                              params_dtype=params_dtype)
                  for i, part in asked), return_exceptions=True)
        first = self._answered([i for i, _ in asked], results)
        if first.not_modified:
            return ParamsResult(first.version, first.step, first.lr, {}, not_modified=True)
        merged: dict[str, torch.Tensor] = {}
        for r in results:
            if isinstance(r, ParamsResult) and r.params:
                merged.update(r.params)
        return ParamsResult(first.version, first.step, first.lr,
                            {n: merged[n] for n in rows})

    async def _check_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """A row pull's checks, as an unsharded session makes them (:func:`sparse.check_rows
        <app.engine.sparse.check_rows>`), on shape-only stand-ins of the parameters."""
        if self._shapes is None:
            info = await self.describe(self.key)
            self._shapes = {n: torch.empty(p["shape"], dtype=TORCH_DTYPES[p["dtype"]],
                                           device="meta")
                            for n, p in info.params.items()}
        sparse.check_rows(self._shapes, rows)

    async def _wait_for(self, min_version: int | None, wait_s: float) -> None:
        """A long poll's wait: until the session reaches ``min_version``, ``wait_s`` (capped)
        passes, or the server drains."""
        if min_version is None or wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_s, MAX_WAIT_S)
        while True:
            changed = self._changed
            version = self._version
            if version is None:
                version = (await self.describe(self.key)).version
            remaining = deadline - loop.time()
            if version >= min_version or remaining <= 0 or self._draining:
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _answered(self, asked: list[int], results: Sequence[ParamsResult | BaseException]
                  ) -> ParamsResult:
        """The first of the shards' answers to a read, once none refused it and all are at
        one version."""
        errors = {i: r for i, r in zip(asked, results, strict=True)
                  if isinstance(r, BaseException)}
        if errors:
            raise first_refusal(errors, self.layout)
        outs = [r for r in results if isinstance(r, ParamsResult)]
        self._check_lockstep(outs)
        return outs[0]

    async def export_state(self, key: str) -> StateExport:
        async with self._lock:
            self._check_usable()
            await self._settled()
            outs = await self._all(lambda host, skey: host.export_state(skey))
        self._check_lockstep(outs)
        return StateExport(merge_state([o.state_dict for o in outs], self.layout,
                                       [o.state_order for o in outs]),
                           outs[0].version, outs[0].step, outs[0].revision,
                           token=creation_tokens.joined([o.token for o in outs]))

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        raise history_refused()

    async def status(self, *, memory: bool = False) -> EngineStatus:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ operations
    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> StepResult:
        """``upcast``: each shard widens its part of the gradients as an unsharded session
        widens them (``?upcast=true``). ``scalars`` are refused (:func:`scalars_refused`)."""
        if scalars:
            raise scalars_refused()
        if worker is not None:
            ps.check_worker(worker)
        out: StepResult = await self.execute(key, Step(grads, base_version, options=options,
                                                       upcast=upcast,
                                                       touched=want_params == "touched",
                                                       request=True, refuse_replaced=True,
                                                       scheduler_range=True,
                                                       tensor_range=True,
                                                       counter_range=True,
                                                       scaled_lr=True),
                                             idem=idem, want_params=want_params)
        return out

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any:
        layout = self.layout
        every = range(layout.shards)
        ops: dict[int, Operation]
        if isinstance(op, Step):
            self._check_names(op.grads, "grads")
            ops = {i: dataclasses.replace(op, grads=layout.part(op.grads, i)) for i in every}
        elif isinstance(op, Push):
            if op.scalars:
                raise scalars_refused()
            self._check_names(op.grads, "grads")
            # (to every shard, with its part or nothing: a push cut between the shards'
            # commits is found and undone at start, and the answer's ``accumulated`` lists
            # what every shard holds, not only the shards pushed to)
            ops = {i: Push(layout.part(op.grads, i), op.upcast, every_shard=True)
                   for i in every}
        elif isinstance(op, Overwrite):
            if not op.params:
                raise Invalid("give at least one parameter", code="invalid_params",
                              field="params")
            self._check_names(op.params, "params")
            ops = {i: Overwrite(layout.part(op.params, i)) if layout.part(op.params, i)
                   else Bump() for i in every}
        elif isinstance(op, ImportState):
            if op.request:  # (before the split, which would read a key past int64 as an id)
                state_dicts.refuse_unwritable(op.state)
            ops = dict(enumerate(ImportState(sd, op.request,
                                             scheduler_range=op.scheduler_range,
                                             tensor_range=op.tensor_range, ranks=ranks,
                                             shared=op.shared)
                                 for sd, ranks in split_state(op.state, layout)))
        elif isinstance(op, Configure):
            if op.options.get("sync") is not None:
                raise Invalid("a sharded session steps without synchronous rounds",
                              code="invalid_body", field="sync")
            ops = dict.fromkeys(every, op)
        elif isinstance(op, (ZeroGrad, UpdateParamGroup, SchedulerStep)):
            ops = dict.fromkeys(every, op)
        elif isinstance(op, AddParamGroup):
            raise Invalid("add_param_group is not supported on a sharded session (its layout "
                          "is fixed at create); create the session with every group",
                          code="not_supported", field="param_groups")
        else:  # pragma: no cover - every operation kind is listed above
            raise Invalid(f"{op.kind} is not supported on a sharded session",
                          code="not_supported")
        ops = {i: part.expecting(op) for i, part in ops.items()}  # (every shard checks it)
        async with self._lock:
            self._check_usable()
            await self._settled()
            await self._finish_pending()
            refusal = None
            if isinstance(op, ImportState):
                state = op.state
                refusal = lambda i, e: import_refusal(e, i, state, layout)  # noqa: E731
            results, nonfinite = await self._two_phase(ops, idem, want_params, refusal)
            merged = self._merge(op, results, want_params, nonfinite)
            version = getattr(merged, "version", None)
            if isinstance(version, int):
                self._version = version
        self._wake()
        return merged

    # ------------------------------------------------------------------ the two phases
    async def _two_phase(
        self, ops: dict[int, Operation], idem: IdemKey | None, want_params: ReturnParams,
        refusal: Callable[[int, BaseException], BaseException] | None = None,
    ) -> tuple[dict[int, Any], list[str]]:
        """Prepare on every shard, then commit on every shard: the shards' results, and the
        gradients found non-finite. ``refusal`` puts a shard's refusal in the session's
        terms."""
        idem = idem or IdemKey(f"optserve-tx-{uuid.uuid4().hex}")
        prepared = await asyncio.gather(
            *(self.shards[i][0].prepare(self.shards[i][1], op, idem) for i, op in ops.items()),
            return_exceptions=True)
        checked: dict[int, Checked] = {}
        errors: dict[int, BaseException] = {}
        for i, r in zip(ops, prepared, strict=True):
            if isinstance(r, BaseException):
                errors[i] = refusal(i, r) if refusal is not None else r
            else:
                checked[i] = r
        if errors:
            await asyncio.gather(*(self.shards[i][0].abort(self.shards[i][1], idem)
                                   for i in checked), return_exceptions=True)
            raise first_refusal(errors, self.layout)
        fresh = [c for c in checked.values() if not c.applied]
        if len({(c.version, c.revision) for c in fresh}) > 1:
            await asyncio.gather(*(self.shards[i][0].abort(self.shards[i][1], idem)
                                   for i in checked), return_exceptions=True)
        self._check_lockstep(fresh)
        commit: dict[int, Operation | None] = {i: None for i in ops}
        if any(c.skip for c in checked.values()):  # the whole session skips this step
            for i, op in ops.items():
                assert isinstance(op, Step)
                commit[i] = SkipStep(op.options)
        for i, c in checked.items():
            if c.applied and commit[i] is None:
                commit[i] = ops[i]  # nothing was kept for it: its commit is answered anyway
        results = await self._commit(ops, commit, idem, want_params)
        return results, [n for c in checked.values() for n in c.nonfinite]

    async def _commit(self, ops: dict[int, Operation], commit: dict[int, Operation | None],
                      idem: IdemKey, want_params: ReturnParams) -> dict[int, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.commit_timeout_s
        results: dict[int, Any] = {}
        todo = dict(commit)
        delay = 0.05
        while True:
            outs = await asyncio.gather(
                *(self.shards[i][0].commit(self.shards[i][1], idem, op, want_params=want_params)
                  for i, op in todo.items()), return_exceptions=True)
            failed: dict[int, BaseException] = {}
            for i, r in zip(list(todo), outs, strict=True):
                if isinstance(r, BaseException):
                    failed[i] = r
                else:
                    results[i] = r
            if not failed:
                return results
            hard = {i: e for i, e in failed.items() if not retryable(e)}
            if hard:
                self._damaged = (f"a shard failed to apply an operation every shard had "
                                 f"accepted: {hard[min(hard)]}")
                raise first_refusal(hard, self.layout)
            # the operation itself, again: whatever the host kept for the commit may be gone
            todo = {i: (commit[i] or ops[i]) for i in failed}
            if loop.time() + delay > deadline:
                self._pending = _Pending({i: op for i, op in todo.items() if op is not None},
                                         idem)
                first = failed[min(failed)]
                raise Unavailable(f"a shard's host did not take the operation ({first}); it is "
                                  "committed and will be completed: retry with the same "
                                  "Idempotency-Key for its answer", code="host_restarting",
                                  retry_after=2.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _finish_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        await self._commit(pending.ops, dict(pending.ops), pending.idem, False)

    # ------------------------------------------------------------------ helpers
    async def _all(self, call: Callable[[Host, str], Awaitable[T]]) -> list[T]:
        results = await asyncio.gather(*(call(h, k) for h, k in self.shards),
                                       return_exceptions=True)
        errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
        if errors:
            error = first_refusal(errors, self.layout)
            if isinstance(error, NotFound) and error.code == "session_not_found":
                # (a shard's own 404 named the shard: ``no session 'shard1of2'``)
                missing = min(i for i, e in errors.items() if e is error)
                raise NotFound(f"no session {split_key(self.key)[1]!r:.140}: its shard "
                               f"{missing} of {self.layout.shards} is missing (a create a crash "
                               "cut part way: its retry with the same Idempotency-Key finishes "
                               "it, a delete of the id removes the rest)",
                               code="session_not_found", field="session_id") from None
            raise error
        return [r for r in results if not isinstance(r, BaseException)]

    def _check_usable(self) -> None:
        if self._damaged is not None:
            if self._damaged == "the session was deleted":
                raise no_session(self.key)
            raise Unavailable(f"sharded session {split_key(self.key)[1]!r:.140} is out of "
                              f"service: {self._damaged}; it cannot be restored: delete it",
                              code="session_damaged", retry_after=None)

    def _check_lockstep(self, shards: Sequence[Any]) -> None:
        """Shards (their answers: each one's ``version``, and its ``revision`` where it has
        one) at different versions, or revisions (an option change moves only the revision):
        an operation reached some of them only (its coordinator died mid-commit). Its
        client's retry, with the same key, completes it; until then everything else is
        refused with a retryable 503, and a disagreement that outlasts the grace takes the
        session out of service."""
        versions = {s.version for s in shards}
        revisions: set[int] = {s.revision for s in shards if hasattr(s, "revision")}
        if len(versions) <= 1 and len(revisions) <= 1:
            self._out_of_step_since = None
            return
        now = time.monotonic()
        if self._out_of_step_since is None:
            self._out_of_step_since = now
        what = (f"its shards are at different versions ({sorted(versions)}): an operation "
                "reached some shards only" if len(versions) > 1 else
                f"its shards are at different revisions ({sorted(revisions)}): a change "
                "reached some shards only")
        if now - self._out_of_step_since >= 2 * self.commit_timeout_s:
            self._damaged = what
            self._check_usable()
        raise Unavailable(f"sharded session {split_key(self.key)[1]!r:.140}: {what}; its "
                          "client's retry with the same Idempotency-Key completes it, and "
                          "other operations wait until then", code="shards_out_of_step",
                          retry_after=1.0)

    def entries_refusal(self, worker: str | None, op: EntriesOp = "step"
                        ) -> EntriesRefusal | None:
        """For a step's, a push's or an overwrite's (``op``) body naming more tensors than
        the session holds: what refuses it from its entries alone (:meth:`Front.
        entries_refusal <app.engine.front.Front.entries_refusal>`) with the answer
        :meth:`step` or :meth:`execute` gives once its tensors are made: its first name that
        is not a parameter's (:meth:`_check_names`, which :meth:`execute` runs before
        anything else looks at the tensors, an overwrite's precondition included). None
        where that answer could be another: a worker id :func:`ps.check_worker` refuses; and
        a body with ``scalars`` is decoded whole (they are refused first:
        ``EntriesRefusal.scalars``)."""
        return layout_refusal(self.layout, worker, op)

    def _check_names(self, tensors: Iterable[str], field: str) -> None:
        check_layout_names(self.layout, tensors, field)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def drain(self) -> None:
        """The server is draining (SIGTERM): its long polls answer now with the current
        state, as at the end of their wait."""
        self._draining = True
        self._wake()

    def _merge(self, op: Operation, results: dict[int, Any], want_params: ReturnParams,
               nonfinite: list[str]) -> Any:
        outs = [results[i] for i in sorted(results)]
        self._check_lockstep([r for r in outs if hasattr(r, "version")])
        first = outs[0]
        replayed = all(getattr(r, "replayed", False) for r in outs)
        if isinstance(first, StepResult):
            steps = [r for r in outs if isinstance(r, StepResult)]
            skipped = any(r.skipped for r in steps)
            order = self.layout.names()
            seen = set(nonfinite) | {n for r in steps for n in r.nonfinite}
            params = (merge_touched([r.params for r in steps], self.layout)
                      if want_params == "touched" else
                      merge_params([r.params for r in steps], self.layout) if want_params
                      else None)
            return dataclasses.replace(
                first, skipped=skipped, nonfinite=[n for n in order if n in seen],
                params=params, replayed=replayed,
                metrics=metrics.merged([r.metrics for r in steps]),
                params_version=first.params_version if replayed else None)
        if isinstance(first, GradsResult):
            accumulated = sorted({n for r in outs for n in r.accumulated})
            return dataclasses.replace(first, accumulated=accumulated, replayed=replayed)
        if isinstance(first, ParamsResult):  # an overwrite: the parameters it wrote
            assert isinstance(op, Overwrite)
            return ParamsResult(first.version, first.step, first.lr,
                                merge_params([r.params for r in outs], self.layout,
                                             [n for n in self.layout.names() if n in op.params]),
                                replayed=replayed)
        if isinstance(first, SchedulerResult):
            return dataclasses.replace(first, replayed=replayed)
        if isinstance(first, SessionInfo):
            infos = [r for r in outs if isinstance(r, SessionInfo)]
            info = merge_info(self.key, infos, self.layout, [h.name for h, _ in self.shards])
            info.replayed = replayed
            return info
        return first


def layout_refusal(layout: ShardLayout, worker: str | None, op: EntriesOp = "step"
                   ) -> EntriesRefusal | None:
    """:meth:`ShardedSession.entries_refusal` over a sharded session's ``layout`` (also a Ray
    front's, from the session's directory entry: :meth:`app.engine.ray_host._Placed.
    early_refusal`)."""
    if worker is not None:
        try:
            ps.check_worker(worker)
        except Invalid:
            return None
    held = len(layout.owner)
    field = "params" if op == "overwrite" else "grads"
    return EntriesRefusal(held=lambda: held,
                          refuse=lambda entries, upcast, scalars: check_layout_names(
                              layout, entries, field),
                          scalars=False)


def check_layout_names(layout: ShardLayout, tensors: Iterable[str], field: str) -> None:
    """422 ``unknown_parameter`` for the first of ``tensors`` the session's ``layout`` does not
    hold."""
    for name in tensors:
        if name not in layout.owner:
            shown = ", ".join(repr(n) for n in layout.names()[:20])
            raise Invalid(f"unknown parameter {name!r:.80}; this session has {shown}",
                          code="unknown_parameter", field=f"{field}.{name}")
