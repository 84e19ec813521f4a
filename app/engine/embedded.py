"""The embedded engine: sessions in this process, one worker thread per device, persisted by
the embedded store (snapshot + write-ahead log per session).

Every mutation runs on the worker thread; when it succeeds, its log record is appended there
too (so the log holds updates in exactly the order they were applied), and the caller awaits
the record's durability before answering. On start every stored session is rebuilt: its
snapshot, then a replay of its log through the same session methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.engine import optimizers, persist, ps
from app.engine.interface import (
    CreateSpec,
    Durability,
    GroupSpec,
    NonFinitePolicy,
    ParamsResult,
    StepResult,
    Tensors,
)
from app.engine.session import Session, check_session_id
from app.engine.store import Store, StoreCorrupt
from app.engine.worker import DeviceWorker, Observer
from app.errors import Conflict, Invalid, NotFound, OptserveError, TooMany

log = logging.getLogger("optserve.engine")
T = TypeVar("T")
DEFAULT_TENANT = "default"


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"OPTSERVE_DEVICE={setting} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"OPTSERVE_DEVICE={setting}: only auto, cpu, cuda, cuda:N")
    return device


@dataclass
class Limits:
    max_sessions: int = 0  # per tenant; 0 = unlimited
    max_session_elements: int = 0  # parameter elements per session; 0 = unlimited


class EmbeddedEngine:
    def __init__(
        self,
        device: str = "auto",
        torch_threads: int = 0,
        default_nonfinite: NonFinitePolicy = "reject",
        data_dir: Path | None = None,
        durability: Durability = "memory",
        snapshot_every_steps: int = 1000,
        snapshot_every_s: float = 300.0,
        fsync_interval_s: float = 0.05,
        limits: Limits | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._device = resolve_device(device)
        self.device = str(self._device)
        self._worker = DeviceWorker(self._device, torch_threads, observer)
        self._sessions: dict[str, Session] = {}
        self._default_nonfinite: NonFinitePolicy = default_nonfinite
        self._store = Store(data_dir, fsync_interval_s) if data_dir is not None else None
        self._default_durability: Durability = durability if self._store else "memory"
        self._snapshot_every_steps = snapshot_every_steps
        self._snapshot_every_s = snapshot_every_s
        self._limits = limits or Limits()
        self.refused: dict[str, str] = {}
        self._snapshotter: asyncio.Task[None] | None = None
        # Parameter-server mode, all on the event loop: open sync rounds per session key,
        # events set when a session's version may have changed (long polls), round tasks.
        self._sync: dict[str, ps.SyncState] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._round_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._worker.start()
        await self._worker.run(self._warm_up)
        if self._store is not None:
            self._store.open()
            await self._worker.run(self._restore_all)
            self._snapshotter = asyncio.create_task(self._snapshot_periodically())
        for key, session in list(self._sessions.items()):
            self._set_sync(key, session.ps.sync)

    def _set_sync(self, key: str, config: ps.SyncConfig | None) -> None:
        """Take a session's sync configuration on the loop (create, restore, configure)."""
        state = self._sync.get(key)
        if config is None:
            if state is not None:
                del self._sync[key]
                if state.round is not None and state.round.pushes:
                    self._close_round(state, partial=True)  # sync turned off: nothing lost
            return
        if state is None:
            tenant, session_id = key.split("~", 1)
            self._sync[key] = ps.SyncState(tenant, session_id, config)
            return
        state.config = config
        rnd = state.round
        if rnd is not None and len(rnd.pushes) >= config.workers:
            self._close_round(state, partial=False)  # K lowered: the round is complete

    async def stop(self) -> None:
        """Snapshot every session (so the next start replays nothing), then stop."""
        if self._snapshotter is not None:
            self._snapshotter.cancel()
        for state in self._sync.values():
            if state.round is not None:
                state.round.fail(Conflict("the server is shutting down; this round's gradients "
                                          "were discarded", code="round_aborted"))
                state.round = None
        if self._round_tasks:
            await asyncio.gather(*self._round_tasks, return_exceptions=True)
        if self._store is not None and self._worker.alive():
            await self._worker.run(lambda: self._snapshot_all(force=True))
            self._store.close()
        self._worker.stop()

    def session_count(self) -> int:
        return len(self._sessions)

    def memory_bytes(self) -> int:
        """Bytes of tensors the sessions hold (CUDA: what torch's allocator has handed out)."""
        if self._device.type == "cuda":
            return int(torch.cuda.memory_allocated(self._device))
        total = 0
        for s in list(self._sessions.values()):
            total += sum(p.numel() * p.element_size() for p in s.params.values())
            total += sum(a.numel() * a.element_size() for a in s.accum.values())
            for st in list(s.optimizer.state.values()):
                total += sum(v.numel() * v.element_size() for v in st.values()
                             if isinstance(v, torch.Tensor))
        return total

    def ready(self) -> bool:
        return self._worker.alive() and (self._store is None or self._store.writable())

    def _warm_up(self) -> None:
        """Load torch's lazily imported kernels before readiness, so the first client
        request does not pay for them."""
        for name in optimizers.SUPPORTED:
            cls = optimizers.optimizer_class(name)
            optimizers.probe(cls, {}, [{}], [torch.float32], self._device, {})

    # ------------------------------------------------------------------ persistence
    def _restore_all(self) -> None:
        assert self._store is not None
        for key in self._store.session_ids():
            started = time.perf_counter()
            if self._store.incomplete(key):  # a create cut short: never acknowledged
                log.warning("discarding %s: a create that a crash interrupted (no snapshot, "
                            "nothing logged)", key)
                self._store.discard(key)
                continue
            try:
                session, replayed, torn = self._restore(key)
            except (StoreCorrupt, OptserveError, Exception) as exc:  # refuse, serve the rest
                # relative to the sessions directory: /readyz shows it to the tenant
                reason = f"{type(exc).__name__}: {exc}".replace(
                    f"{self._store.sessions_dir}/", "")
                self.refused[key] = reason
                log.error("refusing stored session %s: %s", key, reason)
                continue
            self._sessions[key] = session
            log.info("restored session %s at version %d (%d logged updates replayed%s) in "
                     "%.2f s", key, session.version, replayed,
                     ", torn last record dropped" if torn else "",
                     time.perf_counter() - started)

    def _restore(self, key: str) -> tuple[Session, int, bool]:
        assert self._store is not None
        payload, records, torn = self._store.read(key)
        tree = persist.decode_tree(payload, persist.SNAPSHOT_KEY)
        session = Session.restore(tree, self._device)
        replayed = 0
        for record in records:
            op, args, version, seq = persist.decode_record(record)
            if seq <= session.seq:
                continue  # already in the snapshot (crash between snapshot and truncate)
            if seq != session.seq + 1:
                raise StoreCorrupt(f"log record {seq} follows {session.seq}: a record is missing")
            session.apply(op, args)
            session.seq = seq
            if session.version != version:
                raise StoreCorrupt(f"replay of record {seq} ({op}) reached version "
                                   f"{session.version}, the log says {version}")
            replayed += 1
        return session, replayed, torn

    def _snapshot(self, key: str, session: Session) -> None:
        if self._store is None or session.durability == "memory":
            return
        payload = persist.encode_tree(session.snapshot_tree(), persist.SNAPSHOT_KEY)
        self._store.write_snapshot(key, payload)
        session.seq_at_snapshot = session.seq
        session.snapshot_time = time.monotonic()

    def _snapshot_all(self, force: bool = False) -> None:
        now = time.monotonic()
        for key, session in list(self._sessions.items()):
            due = session.seq > session.seq_at_snapshot and (
                force or now - session.snapshot_time >= self._snapshot_every_s)
            if due:
                try:
                    self._snapshot(key, session)
                except OSError as exc:
                    log.error("snapshot of %s failed: %s (its log still holds every update)",
                              key, exc)

    async def _snapshot_periodically(self) -> None:
        period = max(0.5, min(self._snapshot_every_s, 60.0) / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._worker.run(self._snapshot_all)
            except RuntimeError:
                return

    def _logged(self, key: str, session: Session, op: str, args: dict[str, Any]) -> Future[None]:
        """Append the record of an update that just succeeded; snapshot when one is due."""
        done: Future[None] = Future()
        if self._store is None or session.durability == "memory":
            done.set_result(None)
            return done
        session.seq += 1
        payload = persist.encode_record_parts(op, args, session.version, session.seq)
        try:
            done = self._store.append(key, payload, session.durability)
        except OSError as exc:
            # Applied in memory but not logged: only a snapshot (which holds it) keeps the disk
            # in step with memory; if that fails too, the client hears of it.
            log.error("logging %s on %s failed (%s); taking a snapshot instead", op, key, exc)
            self._snapshot(key, session)
            done = Future()
            done.set_result(None)
            return done
        if session.seq - session.seq_at_snapshot >= self._snapshot_every_steps:
            try:
                self._snapshot(key, session)
            except OSError as exc:  # the update is in the log; the next one tries again
                log.error("snapshot of %s failed: %s (its log still holds every update)",
                          key, exc)
        return done

    async def _mutate(
        self, tenant: str, session_id: str, op: str, args: dict[str, Any],
        fn: Callable[[Session], T],
    ) -> T:
        def run() -> tuple[T, Future[None]]:
            key = self._key(tenant, session_id)
            session = self._get(key, session_id)
            result = fn(session)
            return result, self._logged(key, session, op, args)
        result, durable = await self._worker.run(run, op)
        self._version_changed(self._key(tenant, session_id))
        await asyncio.wrap_future(durable)
        return result

    def _version_changed(self, key: str) -> None:
        """Wake the long polls on this session (they check the version again)."""
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def _key(tenant: str, session_id: str) -> str:
        return f"{tenant}~{session_id}"

    def _get(self, key: str, session_id: str) -> Session:
        session = self._sessions.get(key)
        if session is None:
            raise NotFound(f"no session {session_id!r:.140}", code="session_not_found",
                           field="session_id")
        return session

    # ------------------------------------------------------------------ sessions
    async def create(self, spec: CreateSpec, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            session_id = check_session_id(spec.id) if spec.id is not None else uuid.uuid4().hex
            key = self._key(tenant, session_id)
            if key in self._sessions or key in self.refused:
                raise Conflict(f"a session with id {session_id!r} already exists",
                               code="session_exists", field="id")
            self._check_limits(tenant, spec)
            nonfinite = spec.nonfinite or self._default_nonfinite
            ps_config = ps.parse(spec.ps_options)
            session = Session.create(session_id, spec.optimizer, spec.groups, spec.options,
                                     spec.scheduler, nonfinite, self._device)
            session.ps = ps_config
            durability = spec.durability or self._default_durability
            if self._store is None and durability != "memory":
                durability = "memory"
            session.durability = durability
            self._snapshot(key, session)
            self._sessions[key] = session
            return session.describe()
        desc = await self._worker.run(op)
        key = self._key(tenant, desc["id"])
        self._set_sync(key, ps.parse({"sync": desc["sync"]}).sync)
        return self._with_round(key, desc)

    def _check_limits(self, tenant: str, spec: CreateSpec) -> None:
        lim = self._limits
        if lim.max_sessions:
            mine = sum(1 for k in self._sessions if k.startswith(f"{tenant}~"))
            if mine >= lim.max_sessions:
                raise TooMany(f"this tenant already has {mine} sessions; the limit "
                              f"(OPTSERVE_MAX_SESSIONS) is {lim.max_sessions}",
                              code="too_many_sessions", field="id", limit=lim.max_sessions)
        if lim.max_session_elements:
            n = sum(t.numel() for g in spec.groups for t in g.params.values())
            if n > lim.max_session_elements:
                raise Invalid(f"the session would hold {n} parameter elements; the limit "
                              f"(OPTSERVE_MAX_SESSION_ELEMENTS) is {lim.max_session_elements}",
                              code="session_too_large", field="params",
                              limit=lim.max_session_elements)

    async def describe(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        key = self._key(tenant, session_id)
        return self._with_round(key, await self._worker.run(
            lambda: self._get(key, session_id).describe()))

    def _with_round(self, key: str, desc: dict[str, Any]) -> dict[str, Any]:
        """A description plus the workers that have pushed to the open sync round."""
        state = self._sync.get(key)
        if state is not None and isinstance(desc.get("sync"), dict):
            rnd = state.round
            desc["sync"] = {**desc["sync"], "pending": sorted(rnd.pushes) if rnd else []}
        return desc

    async def list_sessions(self, *, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        prefix = f"{tenant}~"
        return await self._worker.run(
            lambda: [s.describe() for k, s in self._sessions.items() if k.startswith(prefix)])

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        key = self._key(tenant, session_id)

        def op() -> None:
            self._get(key, session_id)
            del self._sessions[key]
            if self._store is not None:
                self._store.delete(key)
        await self._worker.run(op)
        state = self._sync.pop(key, None)
        if state is not None and state.round is not None:
            state.round.fail(NotFound(f"session {session_id!r:.140} was deleted during the "
                                      "round", code="session_not_found", field="session_id"))
        self._version_changed(key)

    # ------------------------------------------------------------------ updates
    async def step(
        self, session_id: str, grads: Tensors, *, return_params: bool,
        worker: str | None = None, base_version: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> StepResult:
        """One step now (async mode), or this worker's push into the open sync round, waiting
        for the round's step."""
        if worker is not None:
            ps.check_worker(worker)
        key = self._key(tenant, session_id)
        state = self._sync.get(key)
        if state is not None:
            return await self._sync_push(state, key, grads, worker, base_version, return_params)
        args: dict[str, Any] = {"grads": grads}

        def op(s: Session) -> StepResult:
            staleness, lr_div = None, None
            if base_version is not None:
                staleness = s.staleness(base_version)
                if s.ps.staleness_lr == "inverse" and staleness > 0:
                    lr_div = 1.0 + staleness
                    args["lr_div"] = lr_div  # logged after this returns, replayed by apply
            result = s.step(grads, return_params, lr_div)
            result.staleness = staleness
            return result
        return await self._mutate(tenant, session_id, "step", args, op)

    # ------------------------------------------------------------------ sync rounds
    async def _sync_push(
        self, state: ps.SyncState, key: str, grads: Tensors, worker: str | None,
        base_version: int | None, return_params: bool,
    ) -> StepResult:
        if worker is None:
            raise Invalid("this session steps in synchronous rounds: name the worker in the "
                          "X-Optserve-Worker header", code="missing_worker",
                          field="X-Optserve-Worker")
        rnd = state.open_round()
        if worker in rnd.pushes or worker in rnd.reserved:
            raise Conflict(f"worker {worker!r} already pushed to this round; wait for its step",
                           code="duplicate_push", field="X-Optserve-Worker", worker=worker)
        rnd.reserved.add(worker)
        try:
            def check() -> Tensors:
                s = self._get(key, state.session_id)
                if base_version is not None:
                    s.staleness(base_version)
                return s.check_grads(grads)
            checked = await self._worker.run(check, "sync_push")
        finally:
            rnd.reserved.discard(worker)
        if self._sync.get(key) is not state:  # sync turned off (or deleted) meanwhile
            return await self.step(state.session_id, grads, return_params=return_params,
                                   worker=worker, base_version=base_version,
                                   tenant=state.tenant)
        rnd = state.open_round()  # the same one unless it closed (timeout) meanwhile
        if worker in rnd.pushes:
            raise Conflict(f"worker {worker!r} already pushed to this round; wait for its step",
                           code="duplicate_push", field="X-Optserve-Worker", worker=worker)
        waiter: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        rnd.pushes[worker] = checked
        rnd.waiters[worker] = waiter
        rnd.want_params = rnd.want_params or return_params
        if rnd.timer is None:
            rnd.timer = asyncio.get_running_loop().call_later(
                state.config.timeout_s, self._round_timeout, state, rnd)
        if len(rnd.pushes) >= state.config.workers:
            self._close_round(state, partial=False)
        result = await waiter
        if not return_params and result.params is not None:
            result = dataclasses.replace(result, params=None)
        return result

    def _close_round(self, state: ps.SyncState, *, partial: bool) -> None:
        """Take the open round out (new pushes start the next one) and step it."""
        rnd = state.round
        assert rnd is not None
        state.round = None
        rnd.cancel_timer()
        task = asyncio.create_task(self._apply_round(state, rnd, partial))
        self._round_tasks.add(task)
        task.add_done_callback(self._round_tasks.discard)

    async def _apply_round(self, state: ps.SyncState, rnd: ps.Round, partial: bool) -> None:
        """One step with the round's reduced gradients, logged as one ordinary ``step``
        record (replay knows nothing of rounds); every waiter gets the same result."""
        config = state.config
        args: dict[str, Any] = {}

        def op(s: Session) -> StepResult:
            reduced = ps.reduce(rnd.pushes, config.reduce)
            args["grads"] = reduced  # logged after this returns
            return s.step(reduced, rnd.want_params)
        try:
            result = await self._mutate(state.tenant, state.session_id, "step", args, op)
        except BaseException as exc:
            rnd.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        result.sync = {"workers": sorted(rnd.pushes), "expected": config.workers,
                       "partial": partial}
        rnd.settle(result)

    def _round_timeout(self, state: ps.SyncState, rnd: ps.Round) -> None:
        if state.round is not rnd:
            return
        rnd.timer = None
        config = state.config
        if config.on_timeout == "apply_partial":
            self._close_round(state, partial=True)
            return
        state.round = None
        arrived = sorted(rnd.pushes)
        rnd.fail(Conflict(f"the round timed out after {config.timeout_s:g} s with "
                          f"{len(arrived)} of {config.workers} workers ({', '.join(arrived)}); "
                          "its gradients were discarded (on_timeout: fail)",
                          code="round_timeout", workers=arrived, expected=config.workers,
                          timeout_s=config.timeout_s))

    async def configure(
        self, session_id: str, options: dict[str, Any], *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """Change parameter-server options (sync rounds: K, reduce, timeout; max_staleness,
        staleness_lr); a new K applies to the open round."""
        def op(s: Session) -> tuple[dict[str, Any], ps.SyncConfig | None]:
            s.configure(options)
            return s.describe(), s.ps.sync
        desc, sync = await self._mutate(tenant, session_id, "configure", {"options": options},
                                        op)
        key = self._key(tenant, session_id)
        self._set_sync(key, sync)
        return self._with_round(key, desc)

    async def push(
        self, session_id: str, grads: Tensors, *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            s.push(grads)
            return {"version": s.version, "step": s.step_count, "accumulated": sorted(s.accum)}
        return await self._mutate(tenant, session_id, "push", {"grads": grads}, op)

    async def zero_grad(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            s.zero_grad()
            return {"version": s.version, "step": s.step_count, "accumulated": []}
        return await self._mutate(tenant, session_id, "zero_grad", {}, op)

    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        tenant: str = DEFAULT_TENANT,
    ) -> ParamsResult:
        """The parameters; first waiting up to ``wait_s`` (capped) for ``min_version``.
        ``not_modified`` (no tensors) when the version is one of ``unless_versions``."""
        key = self._key(tenant, session_id)
        if min_version is not None and wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(wait_s, ps.MAX_WAIT_S)
            while True:
                # Registered before the version is read: a step in between still wakes us.
                changed = self._changed.setdefault(key, asyncio.Event())
                version = await self._worker.run(
                    lambda: self._get(key, session_id).version, "version")
                remaining = deadline - loop.time()
                if version >= min_version or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    pass

        def op() -> ParamsResult:
            s = self._get(key, session_id)
            s.check_names(names)
            if s.version in unless_versions:
                return ParamsResult(s.version, s.step_count, s.lrs(), {}, not_modified=True)
            return s.pull(names)
        return await self._worker.run(op)

    async def overwrite(
        self, session_id: str, params: Tensors, *, tenant: str = DEFAULT_TENANT
    ) -> ParamsResult:
        return await self._mutate(tenant, session_id, "overwrite", {"params": params},
                                  lambda s: s.overwrite(params))

    async def add_param_group(
        self, session_id: str, group: GroupSpec, *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            limit = self._limits.max_session_elements
            if limit:
                have = sum(p.numel() for p in s.params.values())
                more = sum(t.numel() for t in group.params.values())
                if have + more > limit:
                    raise Invalid(f"the session would hold {have + more} parameter elements; "
                                  f"the limit (OPTSERVE_MAX_SESSION_ELEMENTS) is {limit}",
                                  code="session_too_large", field="params", limit=limit)
            s.add_param_group(group)
            return s.describe()
        args = {"params": group.params, "options": group.options}
        return await self._mutate(tenant, session_id, "add_group", args, op)

    async def update_param_group(
        self, session_id: str, index: int, options: dict[str, Any], *,
        tenant: str = DEFAULT_TENANT,
    ) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            s.update_param_group(index, options)
            return s.describe()
        args = {"index": index, "options": options}
        return await self._mutate(tenant, session_id, "update_group", args, op)

    async def scheduler_step(
        self, session_id: str, metric: float | None, *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            s.scheduler_step(metric)
            return {"version": s.version, "step": s.step_count, "lr": s.lrs(),
                    "last_epoch": getattr(s.scheduler, "last_epoch", None)}
        return await self._mutate(tenant, session_id, "scheduler_step", {"metric": metric}, op)

    async def export_state(
        self, session_id: str, *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        key = self._key(tenant, session_id)

        def op() -> dict[str, Any]:
            s = self._get(key, session_id)
            return {"state_dict": s.export_state(), "version": s.version, "step": s.step_count}
        return await self._worker.run(op)

    async def import_state(
        self, session_id: str, state: dict[str, Any], *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        def op(s: Session) -> dict[str, Any]:
            s.import_state(state)
            return s.describe()
        return await self._mutate(tenant, session_id, "import", {"state": state}, op)
