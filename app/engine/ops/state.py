"""Operations on optimizer and scheduler state: ``import`` and ``scheduler_step``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from app.engine import (
    optimizers,
    scheduler_writes,
    schedulers,
    shared_options,
    state_dicts,
    state_order,
)
from app.engine.interface import SchedulerResult, SessionInfo
from app.engine.ops.base import Expected, Operation, register
from app.engine.ops.params import discarded_answers
from app.engine.rounds import DiscardedPush
from app.engine.session import Session
from app.errors import Invalid


@register
@dataclass
class ImportState(Operation):
    """Load a state dict in torch's format (optimizer state, group options, and the
    scheduler's state), checked completely first: shapes, dtypes, every tensor owning its
    memory, step counters, the non-finite policy, and the scheduler stepped on a copy. In a
    sync session it discards the open round as an overwrite does (``discarded``: the keyed
    pushes it answers with 409 ``stale_gradient``, logged with it).

    A conditional import (:attr:`~app.engine.ops.base.Operation.expected`, as any operation's)
    names the session ``version`` and/or ``revision`` it was prepared from: when the session is
    no longer there, 412 ``precondition_failed`` before anything else is checked, in the same
    hop to the worker as the import itself."""

    kind = "import"
    bumps_version = True
    state: dict[str, Any]
    #: set by requests: also refuses what servers before it accepted (non-finite options and
    #: scheduler state, scheduler-kept group keys out of range: ``prepare_import``). It
    #: travels with the operation; records logged before these checks lack it and replay as
    #: they ran
    request: bool = False
    discarded: list[DiscardedPush] = field(default_factory=list)
    #: set by requests: refused (422 ``scheduler_out_of_range`` naming the imported group key)
    #: when the session's next scheduler step after it would write a group value out of range
    #: (:func:`app.engine.scheduler_writes.import_check`). Logged; records logged before this
    #: check lack it and replay as they ran
    scheduler_range: bool = False
    #: set by requests: a tensor ``lr`` in the state is checked against the parameters' dtype
    #: by its value (422 ``option_overflow``). Logged, as ``scheduler_range``
    tensor_range: bool = False
    #: a shard's part of a sharded session's import: the position in the session's state of
    #: each of its entries (in ``state``'s order, which is the session's). The shard stamps its
    #: entries with them (:mod:`app.engine.state_order`), and a part whose first entry is not
    #: the session's may begin with an empty one. Logged; None for a whole session's import
    ranks: list[int] | None = None
    #: the group option slots (``[group index, key]``) the state held as one tensor (a
    #: ``torch.save`` file of groups sharing one tensor lr: what the front found, before
    #: anything encodes the state), one list per tensor; the import keeps each one tensor, as
    #: torch's ``load_state_dict`` does (:func:`app.engine.state_aliases.shared_group_options`).
    #: Logged: the record's tensors are each their own
    shared: list[list[list[Any]]] = field(default_factory=list)

    def check(self, s: Session) -> state_dicts.PreparedImport:
        ranks = self.ranks
        prepared = state_dicts.prepare_import(
            s, self.state, request=self.request, tensors=self.tensor_range,
            first_elsewhere=ranks is not None and len(ranks) > 0 and ranks[0] != 0)
        if self.ranks is not None and len(self.ranks) != len(prepared.optimizer["state"]):
            raise Invalid(f"{len(self.ranks)} ranks for {len(prepared.optimizer['state'])} "
                          "states", code="state_mismatch", field="state_dict.state")
        new_groups = prepared.optimizer["param_groups"]
        shared_options.check_group_links(new_groups, self.shared)
        if s.scheduler is not None:
            saved = schedulers.capture(s.optimizer, s.scheduler)
            try:
                # (one copy of them all, linked as the import links them)
                options = copy.deepcopy([{k: v for k, v in new.items() if k != "params"}
                                         for new in new_groups])
                shared_options.link_groups(options, self.shared)
                for group, new in zip(s.optimizer.param_groups, options, strict=True):
                    group.update(new)
                if prepared.scheduler is not None:
                    try:
                        s.scheduler.load_state_dict(copy.deepcopy(prepared.scheduler))
                    except optimizers.TORCH_ERRORS as exc:
                        raise Invalid(f"the scheduler state does not load: {exc}",
                                      code="state_mismatch",
                                      field="state_dict.scheduler") from None
                # a schedule at its end (OneCycleLR after its total_steps: a session's own
                # export after its last step) loads as in torch; only its next step is refused
                if schedulers.exhausted(s.scheduler) is None:
                    schedulers.dry_run(s.optimizer, s.scheduler, None, "state_dict.scheduler",
                                       written=scheduler_writes.import_check(s)
                                       if self.scheduler_range else None)
            finally:
                schedulers.restore(s.optimizer, s.scheduler, saved)
        return prepared

    def apply(self, s: Session, plan: state_dicts.PreparedImport) -> SessionInfo:
        opt = s.optimizer
        old_state, old_groups = opt.state, opt.param_groups
        old_sched = (copy.deepcopy(s.scheduler.state_dict()) if s.scheduler is not None
                     else None)
        try:
            state_dicts.load_optimizer_state(opt, plan.optimizer)
            shared_options.link_groups(opt.param_groups, self.shared)
            for group, names in zip(opt.param_groups, plan.names, strict=True):
                group["param_names"] = names
            if plan.scheduler is not None and s.scheduler is not None:
                s.scheduler.load_state_dict(plan.scheduler)
        except optimizers.TORCH_ERRORS as exc:
            opt.state, opt.param_groups = old_state, old_groups
            if s.scheduler is not None and old_sched is not None:
                s.scheduler.load_state_dict(old_sched)
            raise Invalid(f"torch refused the state dict: {exc}", code="state_mismatch",
                          field="state_dict") from None
        s.version += 1
        s.replaced = (s.version, self.kind)
        name_of = {pid: n for g, names in zip(plan.optimizer["param_groups"], plan.names,
                                               strict=True)
                   for pid, n in zip(g["params"], names, strict=True)}
        state_order.note_import(s, [name_of[pid] for pid in plan.optimizer["state"]],
                                self.ranks)
        return s.describe()

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"state": self.state}
        if self.request:
            tree["request"] = True
        if self.discarded:
            tree["discarded"] = [d.to_json() for d in self.discarded]
        if self.scheduler_range:
            tree["scheduler_range"] = True
        if self.tensor_range:
            tree["tensor_range"] = True
        if self.ranks is not None:
            tree["ranks"] = self.ranks
        if self.shared:
            tree["shared"] = self.shared
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> ImportState:
        ranks = tree.get("ranks")
        # (records logged before preconditions were every operation's held them as
        # arguments: a replay drops them, as it drops any operation's)
        expected = Expected.from_json({"version": tree.get("base_version"),
                                       "revision": tree.get("base_revision")})
        return cls(dict(tree["state"]), tree.get("request") is True,
                   [DiscardedPush.from_json(d) for d in tree.get("discarded") or []],
                   tree.get("scheduler_range") is True, tree.get("tensor_range") is True,
                   None if ranks is None else [int(r) for r in ranks],
                   [[[int(i), str(k)] for i, k in slots] for slots in tree.get("shared") or []],
                   expected=expected)

    def refusals(self, s: Session) -> list[tuple[str, str, dict[str, Any]]]:
        return discarded_answers(self.kind, self.discarded, s.version)


@register
@dataclass
class SchedulerStep(Operation):
    """Step the scheduler by hand (with a metric for ReduceLROnPlateau). A NaN or infinite
    metric is taken as torch takes it (NaN is never better, so it counts as a bad epoch; an
    infinity in the good direction becomes ``best``): a loss gone NaN must not stop training
    that would go on in process. The record keeps it as a ``$float`` tag."""

    kind = "scheduler_step"
    metric: float | None = None
    #: set by requests: refused (409 ``scheduler_out_of_range``) when the step would write a
    #: group value out of range (:mod:`app.engine.scheduler_writes`). Logged; records logged
    #: before this check lack it and replay as they ran
    scheduler_range: bool = False
    #: set by requests: what it writes into a tensor ``lr`` is checked by its value too
    #: (:func:`app.engine.scheduler_writes.out_of_range`). Logged, as ``scheduler_range``
    tensor_range: bool = False
    #: set by requests: refused (422 ``counter_overflow``) when the step would count an
    #: integer of the scheduler's state past int64. Logged, as ``scheduler_range``
    counter_range: bool = False

    def check(self, s: Session) -> None:
        if s.scheduler is None or s.scheduler_spec is None:
            raise Invalid("this session has no scheduler", code="no_scheduler",
                          field="scheduler")
        is_plateau = s.scheduler_spec.name == "ReduceLROnPlateau"
        if is_plateau and self.metric is None:
            raise Invalid("ReduceLROnPlateau steps on a metric: send {\"metric\": x}",
                          code="missing_metric", field="metric")
        if not is_plateau and self.metric is not None:
            raise Invalid(f"{s.scheduler_spec.name} takes no metric", code="invalid_metric",
                          field="metric")
        schedulers.dry_run(s.optimizer, s.scheduler, self.metric, written=(
            scheduler_writes.written_check(s, by_hand=True, tensors=self.tensor_range)
            if self.scheduler_range else None), counters=self.counter_range,
            session_id=s.shown_id)

    def apply(self, s: Session, plan: None) -> SchedulerResult:
        assert s.scheduler is not None
        saved = schedulers.capture(s.optimizer, s.scheduler)
        try:
            schedulers.step(s.scheduler, self.metric)
        except optimizers.TORCH_ERRORS as exc:  # the dry run makes this unreachable
            schedulers.restore(s.optimizer, s.scheduler, saved)
            raise Invalid(f"the scheduler cannot step: {exc}", code="scheduler_failed",
                          field="scheduler") from None
        return SchedulerResult(s.version, s.step_count, s.lrs(),
                               getattr(s.scheduler, "last_epoch", None))

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"metric": self.metric}
        if self.scheduler_range:
            tree["scheduler_range"] = True
        if self.tensor_range:
            tree["tensor_range"] = True
        if self.counter_range:
            tree["counter_range"] = True
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> SchedulerStep:
        metric = tree.get("metric")
        return cls(None if metric is None else float(metric),
                   tree.get("scheduler_range") is True, tree.get("tensor_range") is True,
                   tree.get("counter_range") is True)
