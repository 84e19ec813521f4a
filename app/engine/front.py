"""The front: what every engine shares above its session hosts — tenancy (a session key is
``tenant~id``), per-tenant limits, readiness — and nothing of where a session lives. A router
(:mod:`app.engine.router`) names the host of each session key; the front speaks to it only with
operation values and plain results.

Sync rounds and long polls are kept by the host that holds the session (so workers of one
round may talk to different fronts of one cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from app.engine import ps, sparse, state_aliases, state_dicts
from app.engine.answer_stream import AnswerStream
from app.engine.history import HistoryQuery, HistoryResult, downsample
from app.engine.host import EmbeddedHost
from app.engine.idempotency import key_reused
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
    EntriesOp,
    EntriesRefusal,
    Evaluation,
    EvaluationRequest,
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
    session_key,
    split_key,
)
from app.engine.metrics import check_scalars
from app.engine.ops import (
    AddParamGroup,
    Configure,
    Expected,
    ImportState,
    Operation,
    Overwrite,
    Push,
    SchedulerStep,
    UpdateParamGroup,
    ZeroGrad,
)
from app.engine.ops.params import (
    LBFGS_HISTORY,
    check_element_count,
    check_group_count,
    check_lbfgs_history,
    check_param_count,
)
from app.engine.router import InProcessHost, LocalRouter, Router, SessionHost
from app.engine.session import check_session_id
from app.errors import Invalid, NotFound, TooMany

DEFAULT_TENANT = "default"
_TOMBSTONES = 10_000
#: param groups per session: torch's ``add_param_group`` compares every new group with all
#: those before it, so a create's cost grows with the square of its groups (6,000 empty groups,
#: a 160 KB body, held the device worker, and every tenant's requests, for 23 s on a 2-core
#: VM; adding one more group to them another 11 s); 1,024 cost about 1.4 s
MAX_PARAM_GROUPS = 1024


@dataclass
class Limits:
    max_sessions: int = 0  # per tenant; 0 = unlimited
    max_session_elements: int = 0  # parameter elements per session; 0 = unlimited
    max_session_params: int = 0  # parameters (tensors) per session; 0 = unlimited
    max_param_groups: int = MAX_PARAM_GROUPS  # param groups per session


class Front:
    """The engine the HTTP routes call (implements :class:`app.engine.interface.Engine`)."""

    def __init__(self, router: Router | EmbeddedHost, limits: Limits | None = None) -> None:
        self.router: Router = (LocalRouter(router) if isinstance(router, EmbeddedHost)
                               else router)
        self.device = self.router.device
        self.limits = limits or Limits()
        # keyed deletes this front answered, so a retry that finds nothing still gets its 204
        self._tombstones: OrderedDict[tuple[str, str], str] = OrderedDict()
        #: per tenant, held by a create from its count's check (``OPTSERVE_MAX_SESSIONS``)
        #: until its session is counted: creates at once each passed the check otherwise
        self._admitting: dict[str, asyncio.Lock] = {}
        #: keyed creates under way, by (tenant, key): a create of the same key waits for them
        self._keyed_creates: dict[tuple[str, str], asyncio.Event] = {}

    @property
    def host(self) -> EmbeddedHost:
        """The embedded engine's in-process host (tests and tools reach its store and worker
        through it); an AttributeError on other engines."""
        local = getattr(self.router, "local", None)
        if not isinstance(local, InProcessHost):
            raise AttributeError("this engine has no in-process host")
        return local.embedded

    async def start(self) -> None:
        await self.router.start()

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.router.stop(snapshot=snapshot)

    def drain(self) -> None:
        """The server is draining (SIGTERM): sync pushes and long polls waiting through it
        are answered now, rather than keep the drain waiting for them. The embedded engine's
        open sync rounds fail with 409 ``round_aborted`` (:meth:`LocalRouter.drain`); a Ray
        front takes its own pushes out of their rounds (409 ``round_aborted``), leaving those
        of other fronts waiting (:meth:`app.engine.ray_host.RayRouter.drain`). Long polls
        answer with the current state on both."""
        self.router.drain()

    async def status(self, *, memory: bool = False) -> EngineStatus:
        return await self.router.status(memory=memory)

    async def refused(self, *, tenant: str = DEFAULT_TENANT) -> dict[str, str]:
        """This tenant's stored sessions that failed their checks at start (by id)."""
        out = {}
        for key, reason in sorted((await self.router.refused()).items()):
            owner, session_id = split_key(key)
            if owner == tenant:
                out[session_id] = reason
        return out

    async def _host(self, tenant: str, session_id: str) -> tuple[SessionHost, str]:
        key = session_key(tenant, session_id)
        return await self.router.route(key), key

    async def _embedded(self, tenant: str, session_id: str, what: str
                        ) -> tuple[EmbeddedHost, str]:
        """The in-process host of a plain session, for what only it offers (LBFGS
        evaluations): a sharded session or one on a Ray host gets a 422."""
        host, key = await self._host(tenant, session_id)
        if isinstance(host, InProcessHost):
            return host.embedded, key
        raise _only_embedded(what)

    # ------------------------------------------------------------------ sessions
    async def create(self, spec: CreateSpec, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None) -> SessionInfo:
        if idem is None:
            return await self._create(spec, tenant, None)
        # one create of a key at a time: a sharded create's key is indexed once it is done,
        # so creates of the key at once found none and each made a session
        scope = (tenant, idem.key)
        while (busy := self._keyed_creates.get(scope)) is not None:
            await busy.wait()
        done = self._keyed_creates[scope] = asyncio.Event()
        try:
            return await self._create(spec, tenant, idem)
        finally:
            del self._keyed_creates[scope]
            done.set()

    async def _replayed_create(self, tenant: str, idem: IdemKey) -> SessionInfo | None:
        """The session a create under this key made before, described (replayed), or None.
        One deleted between the look and the description (through another front, or another
        request here) is looked at again: its delete marked the key deleted before any host
        deleted it, so the look answers 409 ``session_deleted`` now; before, the retry of
        the create was a 404 ``session_not_found``."""
        missing: NotFound | None = None
        for _ in range(3):
            made = await self.router.find_create(tenant, idem)
            if made is None:
                return None
            try:
                info = await (await self.router.route(made)).describe(made)
            except NotFound as exc:
                missing = exc
                continue
            info.replayed = True
            return info
        assert missing is not None
        raise missing

    async def _create(self, spec: CreateSpec, tenant: str, idem: IdemKey | None
                      ) -> SessionInfo:
        if idem is not None:
            replayed = await self._replayed_create(tenant, idem)
            if replayed is not None:
                return replayed
        session_id = check_session_id(spec.id) if spec.id is not None else uuid.uuid4().hex
        check_param_count(sum(len(g.params) for g in spec.groups),
                          self.limits.max_session_params)
        n = sum(t.numel() for g in spec.groups for t in g.params.values())
        self._check_elements(n)
        self._check_groups(len(spec.groups))
        if spec.optimizer == "LBFGS":
            for i, g in enumerate(spec.groups):
                where = (f"param_groups.{i}.history_size" if "history_size" in g.options
                         else "options.history_size")
                check_lbfgs_history(n, g.options.get(
                    "history_size", spec.options.get("history_size", LBFGS_HISTORY)),
                    self.limits.max_session_elements, where)

        held: list[asyncio.Lock] = []

        async def admit() -> None:
            if self.limits.max_sessions:
                lock = self._admitting.setdefault(tenant, asyncio.Lock())
                await lock.acquire()
                held.append(lock)
            await self._check_session_count(tenant)
        # (the count is checked by the router, only for a new session: a create cut part way,
        # its entry counted already, is finished by its retry at the limit too)
        try:
            return await self.router.create(session_key(tenant, session_id), spec, idem=idem,
                                            admit=admit)
        finally:
            for lock in held:
                lock.release()

    async def _check_session_count(self, tenant: str) -> None:
        """429 ``too_many_sessions`` when the tenant has ``OPTSERVE_MAX_SESSIONS`` sessions
        (the entries of creates cut short, whose fronts died, are dropped before it says so)."""
        lim = self.limits
        if not lim.max_sessions:
            return
        prefix = session_key(tenant, "")
        mine = await self.router.count(prefix)
        if mine >= lim.max_sessions and await self.router.drop_abandoned(prefix):
            mine = await self.router.count(prefix)
        if mine >= lim.max_sessions:
            raise TooMany(f"this tenant already has {mine} sessions; the limit "
                          f"(OPTSERVE_MAX_SESSIONS) is {lim.max_sessions}",
                          code="too_many_sessions", field="id", limit=lim.max_sessions)

    def _check_groups(self, n: int) -> None:
        check_group_count(n, self.limits.max_param_groups)

    def _check_elements(self, n: int) -> None:
        check_element_count(n, self.limits.max_session_elements)

    async def _check_import_history(self, tenant: str, session_id: str, state: Any) -> None:
        """An import's LBFGS ``history_size`` against the elements' limit: the session's
        parameters are fixed (LBFGS takes one group), so checking before the operation holds
        for it (and the import's own check keeps its history within its ``history_size``)."""
        limit = self.limits.max_session_elements
        groups = state.get("param_groups") if limit and isinstance(state, dict) else None
        if not isinstance(groups, list):
            return
        sizes = [(i, g["history_size"]) for i, g in enumerate(groups)
                 if isinstance(g, dict) and "history_size" in g]
        if not sizes:
            return
        host, key = await self._host(tenant, session_id)
        info = await host.describe(key)
        if info.optimizer != "LBFGS":
            return
        n = sum(_numel(p["shape"]) for p in info.params.values())
        for i, size in sizes:
            check_lbfgs_history(n, size, limit, f"state_dict.param_groups.{i}.history_size")

    async def describe(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        host, key = await self._host(tenant, session_id)
        return await host.describe(key)

    async def describe_layout(self, session_id: str, *, tenant: str = DEFAULT_TENANT
                              ) -> SessionInfo:
        """The session's description for what only its parameters' shapes and dtypes matter
        to (sizing a ``torch.save`` import): as :meth:`describe`, but a sharded session's is
        given also while its shards are at different versions, where :meth:`describe` is a
        503 ``shards_out_of_step``. The import that reached some shards only is completed by
        its retry, which is sized here first: refused there, it never could be."""
        from app.engine.shards import ShardedSession
        host, key = await self._host(tenant, session_id)
        if isinstance(host, ShardedSession):
            return await host.describe(key, lockstep=False)
        return await host.describe(key)

    async def list_sessions(self, *, tenant: str = DEFAULT_TENANT) -> list[SessionInfo]:
        return await self.router.list_sessions(session_key(tenant, ""))

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                     idem: IdemKey | None = None, expected: Expected | None = None) -> bool:
        """Delete the session; True when this was a retry of a delete already done (the
        session's host keeps keyed deletes durably; this front also remembers the keys it
        answered, for hosts that no longer know the session)."""
        gone = self._tombstones.get((tenant, idem.key)) if idem is not None else None
        try:
            replayed = await self.router.delete(session_key(tenant, session_id), idem=idem,
                                                expected=expected)
        except NotFound:
            if gone is None:
                raise
            if idem is not None and gone != idem.fingerprint:
                raise key_reused() from None
            return True
        if idem is not None:
            self._tombstones[(tenant, idem.key)] = idem.fingerprint
            while len(self._tombstones) > _TOMBSTONES:
                self._tombstones.popitem(last=False)
        return bool(replayed)

    # ------------------------------------------------------------------ gradients and steps
    async def step(
        self, session_id: str, grads: Tensors, *, return_params: ReturnParams,
        worker: str | None = None, base_version: int | None = None,
        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, params_into: Tensors | None = None,
        upcast: bool = False, params_dtype: torch.dtype | None = None,
        scalars: dict[str, Any] | None = None, answer_metrics: bool = True,
        into_seen: bool = False, answer: AnswerStream | None = None,
    ) -> StepResult:
        """``answer``: the step may write its answer into ``params_into`` chunk by chunk and say
        so as it goes (an embedded session only; :mod:`app.engine.answer_stream`).
        ``answer_metrics=False`` (``?metrics=history``): the answer carries no ``metrics``
        (the step's row in the history has them; an embedded session takes its norms after
        answering). ``into_seen``: the client sees ``params_into`` as it is written, so only
        durable values go there (``EmbeddedHost.execute``)."""
        host, key = await self._host(tenant, session_id)
        checked = check_scalars(scalars) or None
        if isinstance(host, InProcessHost):
            out = await host.embedded.step(key, grads, want_params=return_params,
                                           worker=worker, base_version=base_version,
                                           idem=idem, options=options, params_into=params_into,
                                           upcast=upcast, params_dtype=params_dtype,
                                           scalars=checked, answer_metrics=answer_metrics,
                                           into_seen=into_seen, answer=answer)
        else:
            wanted: ReturnParams = ("touched" if return_params == "touched"
                                    else bool(return_params) or params_into is not None)
            out = await host.step(key, grads, want_params=wanted, worker=worker,
                                  base_version=base_version, idem=idem, options=options,
                                  upcast=upcast, scalars=checked)
            if params_dtype is not None and out.params is not None:
                # (narrowed as the embedded host narrows a step's answer, whole or touched)
                narrowed = await asyncio.to_thread(sparse.narrowed_answer, out.params,
                                                   params_dtype)
                out = dataclasses.replace(out, params=narrowed)
            _copy_into(params_into, out.params)
        if not answer_metrics and out.metrics is not None:
            out = dataclasses.replace(out, metrics=None)
        return out

    async def refuse_unknown(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                             evaluation: bool = False) -> None:
        """The 404 a request on a session nothing holds gets, before its body is read (a
        step's 400 MB to a mistyped id was read whole first): what its operation's first
        look-up would raise (:meth:`Router.refuse_unknown <app.engine.router.Router.
        refuse_unknown>`: the embedded engine's sessions are all in memory; the Ray engine's
        directory, no host asked). Returns where the session may exist: the operation looks
        it up again after the body, so a session deleted meanwhile is still a 404 then, and
        one created after this look-up was not there for the request (its 404 stands).
        ``evaluation``: the request answers an LBFGS evaluation, which only a plain session of
        the embedded engine has: a sharded session or one on a Ray host gets its 422
        ``not_supported_here`` here too, as the evaluation's own look-up gives it."""
        embedded = await self.router.refuse_unknown(session_key(tenant, session_id))
        if evaluation and embedded is None:
            raise _only_embedded("evaluation")

    async def refuse_stale(self, session_id: str, expected: Expected | None, *,
                           tenant: str = DEFAULT_TENANT, idem_key: str | None = None,
                           sharded: bool = True) -> None:
        """The 412 of a change's precondition that can no longer hold, before its request's
        body is read (:meth:`EmbeddedHost.refuse_stale`: the session already past every
        version ``If-Match`` names, or past ``?base_revision=``), as the operation's own check
        would give it; a 404 as :meth:`refuse_unknown`. A session on a Ray host (a sharded one
        too) is checked after the body as before (its version is not in this process's
        memory: asking its hosts costs round trips on every conditional request), but for a
        sharded session of the embedded engine, whose shards are all in this process
        (:meth:`ShardedSession.refuse_stale <app.engine.shards.ShardedSession.refuse_stale>`),
        unless ``sharded`` is False (add_param_group, which a sharded session refuses whatever
        its body: its 422 ``not_supported`` comes first, after the body, as before).
        """
        key = session_key(tenant, session_id)
        embedded = await self.router.refuse_unknown(key)
        if expected is None:
            return
        if embedded is not None:
            embedded.refuse_stale(key, expected, idem_key)
        elif sharded and isinstance(self.router, LocalRouter):
            from app.engine.shards import ShardedSession
            session = await self.router.route(key)
            if isinstance(session, ShardedSession):
                session.refuse_stale(expected, idem_key)

    # ------------------------------------------------------------------ LBFGS evaluations
    async def uses_evaluations(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Whether ``POST .../step`` on this session opens an evaluation step (LBFGS); the
        404 of a session nothing holds, as :meth:`refuse_unknown` (the step's one look-up
        before its body is read: :meth:`EmbeddedHost.uses_evaluations`, the routing's own)."""
        host, key = await self._host(tenant, session_id)
        return isinstance(host, InProcessHost) and host.embedded.uses_evaluations(key)

    async def entries_refusal(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                              idem_key: str | None = None, worker: str | None = None,
                              op: EntriesOp = "step", expected: Expected | None = None
                              ) -> EntriesRefusal | None:
        """:meth:`EmbeddedHost.entries_refusal` for a session of this process, and
        :meth:`ShardedSession.entries_refusal <app.engine.shards.ShardedSession.
        entries_refusal>` for a sharded one (its names are its layout's); for one on a Ray host,
        the Ray routing's ``early_refusal`` (its host's :meth:`EmbeddedHost.held_entries
        <app.engine.host.EmbeddedHost.held_entries>`, asked only for a body naming more tensors
        than it last said the session held; a sharded one's layout)."""
        from app.engine.shards import ShardedSession
        host, key = await self._host(tenant, session_id)
        if isinstance(host, InProcessHost):
            return host.embedded.entries_refusal(key, idem_key, worker, op, expected)
        if isinstance(host, ShardedSession):
            return host.entries_refusal(worker, op)
        early = getattr(host, "early_refusal", None)
        if early is not None:
            refusal: EntriesRefusal | None = await early(key, idem_key, worker, op, expected)
            return refusal
        return None

    async def open_evaluation_step(
        self, session_id: str, first: Evaluation | None, *, return_params: ReturnParams,
        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
        timeout_s: float | None = None, base_version: int | None = None,
    ) -> EvaluationRequest | StepResult:
        embedded, key = await self._embedded(tenant, session_id, "evaluation")
        return await embedded.open_evaluation_step(key, first, want_params=return_params,
                                                   idem=idem, timeout_s=timeout_s,
                                                   base_version=base_version)

    async def evaluate(self, session_id: str, eval_id: str, ev: Evaluation, fingerprint: str,
                       *, tenant: str = DEFAULT_TENANT) -> EvaluationRequest | StepResult:
        embedded, key = await self._embedded(tenant, session_id, "evaluation")
        return await embedded.evaluate(key, eval_id, ev, fingerprint)

    async def abandon_step(self, session_id: str, step_id: str, *,
                           tenant: str = DEFAULT_TENANT) -> str:
        embedded, key = await self._embedded(tenant, session_id, "evaluation")
        return await embedded.abandon_step(key, step_id)

    async def push(self, session_id: str, grads: Tensors, *, tenant: str = DEFAULT_TENANT,
                   idem: IdemKey | None = None, upcast: bool = False,
                   scalars: dict[str, Any] | None = None) -> GradsResult:
        checked = check_scalars(scalars) or None
        host, key = await self._host(tenant, session_id)
        out: GradsResult = await host.execute(
            key, Push(grads, upcast, checked, scalar_names=True), idem=idem)
        return out

    async def history(self, session_id: str, query: HistoryQuery, *,
                      tenant: str = DEFAULT_TENANT) -> HistoryResult:
        """The session's per-step history (rows ``since < n <= until``, chosen fields),
        downsampled to ``query.points`` buckets off the event loop; from the host that holds
        the session, on either engine (a sharded session refuses it: 422
        ``not_supported_here``, :func:`app.engine.shards.history_refused`)."""
        host, key = await self._host(tenant, session_id)
        result = await host.history(key, query)
        if query.points is not None:
            points = query.points
            result.columns = await asyncio.to_thread(downsample, result.columns, points)
        return result

    async def zero_grad(self, session_id: str, *, tenant: str = DEFAULT_TENANT,
                        idem: IdemKey | None = None) -> GradsResult:
        out: GradsResult = await self._execute(tenant, session_id, ZeroGrad(), idem)
        return out

    # ------------------------------------------------------------------ parameters
    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT, params_into: Tensors | None = None,
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """``params_dtype`` (``?params_dtype=``): the parameters narrowed as a step's answer
        is (by the host, or each shard's host, that holds them)."""
        host, key = await self._host(tenant, session_id)
        if isinstance(host, InProcessHost):
            return await host.embedded.pull(key, names, min_version=min_version,
                                            wait_s=wait_s, unless_versions=unless_versions,
                                            params_into=params_into, params_dtype=params_dtype)
        out = await host.pull(key, names, min_version=min_version, wait_s=wait_s,
                              unless_versions=unless_versions, params_dtype=params_dtype)
        _copy_into(params_into, out.params)
        return out

    async def pull_rows(
        self, session_id: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT, params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """Some rows of some parameters (on every engine, sharded sessions too)."""
        host, key = await self._host(tenant, session_id)
        return await host.pull_rows(key, rows, min_version=min_version, wait_s=wait_s,
                                    unless_versions=unless_versions, params_dtype=params_dtype)

    async def overwrite(self, session_id: str, params: Tensors, *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                        expected: Expected | None = None) -> ParamsResult:
        out: ParamsResult = await self._execute(tenant, session_id,
                                                Overwrite(params, expected=expected), idem)
        return out

    async def add_param_group(self, session_id: str, group: GroupSpec, *,
                              tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                              expected: Expected | None = None) -> SessionInfo:
        host, key = await self._host(tenant, session_id)
        lim = self.limits
        if lim.max_session_elements or lim.max_session_params:
            info = await host.describe(key)
            check_param_count(len(info.params) + len(group.params), lim.max_session_params)
            have = sum(_numel(p["shape"]) for p in info.params.values())
            self._check_elements(have + sum(t.numel() for t in group.params.values()))
        # (the groups' bound and the elements' are checked with the operation, under the
        # session's lock: the check above, before it, answers a sharded session's)
        out: SessionInfo = await host.execute(
            key, AddParamGroup(group.params, group.options, request=True,
                               max_groups=self.limits.max_param_groups, tensor_range=True,
                               max_elements=self.limits.max_session_elements or None,
                               max_params=self.limits.max_session_params or None,
                               scaled_lr=True, expected=expected),
            idem=idem)
        return out

    async def update_param_group(self, session_id: str, index: int, options: dict[str, Any],
                                 *, tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                                 expected: Expected | None = None) -> SessionInfo:
        op = UpdateParamGroup(index, options, request=True, tensor_range=True,
                              max_elements=self.limits.max_session_elements or None,
                              noop_kept=True, scaled_lr=True, expected=expected)
        out: SessionInfo = await self._execute(tenant, session_id, op, idem)
        return out

    async def configure(self, session_id: str, options: dict[str, Any], *,
                        tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                        expected: Expected | None = None) -> SessionInfo:
        host, key = await self._host(tenant, session_id)
        ps.check_requested(options)  # (here, not in the record's check: older records replay)
        done: SessionInfo = await host.execute(
            key, Configure(options, request=True, noop_kept=True, expected=expected), idem=idem)
        info = await host.describe(key)  # with the open sync round's pending workers
        info.replayed = done.replayed
        return info

    # ------------------------------------------------------------------ state
    async def scheduler_step(self, session_id: str, metric: float | None, *,
                             tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                             expected: Expected | None = None) -> SchedulerResult:
        op = SchedulerStep(metric, scheduler_range=True, tensor_range=True, counter_range=True,
                           expected=expected)
        out: SchedulerResult = await self._execute(tenant, session_id, op, idem)
        return out

    async def export_state(self, session_id: str, *, tenant: str = DEFAULT_TENANT
                           ) -> StateExport:
        host, key = await self._host(tenant, session_id)
        return await host.export_state(key)

    async def trim(self) -> None:
        """Return free heap pages to the OS (after a large one-off answer was sent)."""
        await self.router.trim()

    async def import_state(self, session_id: str, state: dict[str, Any], *,
                           tenant: str = DEFAULT_TENANT, idem: IdemKey | None = None,
                           expected: Expected | None = None) -> SessionInfo:
        # what a torch.save file held as one tensor, found before anything encodes the state
        # (off the event loop: every tensor of it is looked at)
        # (here, not in the record's check: records of older imports replay as they ran)
        state_dicts.check_state_keys(state)
        await self._check_import_history(tenant, session_id, state)
        shared = await asyncio.to_thread(state_aliases.examine, state)
        op = ImportState(state, request=True, scheduler_range=True, tensor_range=True,
                         shared=shared, expected=expected)
        out: SessionInfo = await self._execute(tenant, session_id, op, idem)
        return out


    async def _execute(self, tenant: str, session_id: str, op: Operation,
                       idem: IdemKey | None) -> Any:
        host, key = await self._host(tenant, session_id)
        return await host.execute(key, op, idem=idem)


def _copy_into(dest: Tensors | None, params: Tensors | None) -> None:
    """Parameters a host sent back, copied into the views a caller owns (the embedded host
    writes them there itself: a shared segment, or the request body answered in place); a
    view of another dtype or shape (a narrowed answer over wider gradients) is left alone:
    the answer sends ``params``."""
    if dest is None or params is None:
        return
    for name, view in dest.items():
        sent = params.get(name)
        if sent is not None and sent.dtype == view.dtype and sent.shape == view.shape:
            view.copy_(sent)


def _only_embedded(what: str) -> Invalid:
    return Invalid(f"{what}: offered only for sessions of the embedded engine that are not "
                   "sharded (this one is sharded or lives on a Ray host)",
                   code="not_supported_here", field=what)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
