"""One optimizer session: named parameters on the device, a real torch optimizer, an optional
scheduler and a gradient accumulator, plus what it needs to answer retries (its idempotency
table). Operations (:mod:`app.engine.ops`) change it; this module holds its construction, its
views, the checks operations share, and its snapshot form.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from app.engine import optimizers, ps, schedulers, state_dicts
from app.engine.idempotency import IdempotencyTable
from app.engine.interface import (
    Durability,
    GroupSpec,
    NonFinitePolicy,
    SessionInfo,
    Tensors,
)
from app.errors import Invalid
from app.wire.dtypes import DTYPE_NAMES
from app.wire.safetensors_body import PackedTensors, pack

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME = 512
#: names the wire formats reserve (a safetensors header key; a sparse tensor's parts)
RESERVED_NAMES = frozenset({"__metadata__"})
#: the dtype option checks assume for a group without parameters (a shard of a sharded session
#: whose part of the group is empty): the widest, so it never refuses what a shard holding the
#: group's parameters accepts
EMPTY_GROUP_DTYPE = torch.float64


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _ID_RE.fullmatch(session_id):
        raise Invalid("id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit", code="invalid_id", field="id")
    return session_id


def check_param_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise Invalid(f"a parameter name must be a string of 1-{MAX_NAME} characters",
                      code="invalid_name", field=field)
    if name in RESERVED_NAMES:
        raise Invalid(f"{name!r} is reserved by the wire formats; choose another parameter name",
                      code="invalid_name", field=field)
    return name


def lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class Session:
    def __init__(
        self,
        session_id: str,
        optimizer_name: str,
        cls: type[torch.optim.Optimizer],
        optimizer: torch.optim.Optimizer,
        params: dict[str, torch.Tensor],
        defaults: dict[str, Any],
        device: torch.device,
        nonfinite: NonFinitePolicy,
    ) -> None:
        self.id = session_id
        self.optimizer_name = optimizer_name
        self.cls = cls
        self.optimizer = optimizer
        self.params = params
        self.defaults = defaults
        self.device = device
        self.nonfinite: NonFinitePolicy = nonfinite
        self.scheduler: schedulers.Scheduler | None = None
        self.scheduler_spec: schedulers.SchedulerSpec | None = None
        self.accum: dict[str, torch.Tensor] = {}
        self.version = 0
        self.step_count = 0
        self.durability: Durability = "memory"
        self.ps = ps.PsConfig()  # parameter-server options (sync rounds, bounded staleness)
        self.idem = IdempotencyTable()
        #: the idempotency key of the create that made this session (tenant-wide retries)
        self.created_by: tuple[str, str] | None = None
        #: each group's options as the create or add_param_group gave them (a restore rebuilds
        #: with these, then loads the state: the running values may be ones torch's
        #: constructor refuses, e.g. an lr a scheduler drove below zero)
        self.group_spec_options: list[dict[str, Any]] = []
        self.seq = 0  # records logged for this session, ever (persistence)
        self.seq_at_snapshot = 0
        self.snapshot_time = 0.0

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(
        cls_,
        session_id: str,
        optimizer_name: str,
        groups: list[GroupSpec],
        options: dict[str, Any],
        scheduler: dict[str, Any] | None,
        nonfinite: NonFinitePolicy,
        device: torch.device,
        *,
        allow_empty: bool = False,
    ) -> Session:
        """Validate a create completely (torch's own checks on a throwaway first) and build the
        session; raises before anything exists. ``allow_empty``: groups may have no parameters
        (the shards of a sharded session keep every group, with the part of it they hold)."""
        cls = optimizers.optimizer_class(optimizer_name)
        defaults = optimizers.normalize_options(cls, options, "options")
        if not groups:
            raise Invalid("give at least one param group with at least one parameter",
                          code="invalid_params", field="param_groups")
        group_opts: list[dict[str, Any]] = []
        seen: set[str] = set()
        dtypes = []
        for i, group in enumerate(groups):
            where = f"param_groups.{i}"
            group_opts.append(optimizers.normalize_options(cls, group.options, where))
            if not group.params and not allow_empty:
                raise Invalid("a param group needs at least one parameter",
                              code="invalid_params", field=f"{where}.params")
            for name, t in group.params.items():
                check_param_name(name, f"{where}.params")
                if name in seen:
                    raise Invalid(f"parameter {name!r:.60} appears twice", code="invalid_params",
                                  field=f"{where}.params.{name}")
                seen.add(name)
                check_param_tensor(name, t, f"{where}.params.{name}")
            dtypes.append(next(iter(group.params.values())).dtype if group.params
                          else EMPTY_GROUP_DTYPE)
        fields = {k: f"options.{k}" for k in defaults}
        for i, g in enumerate(group_opts):
            fields.update({k: f"param_groups.{i}.{k}" for k in g})
        for i, g in enumerate(group_opts):
            optimizers.check_overflow({**defaults, **g}, dtypes[i], f"param_groups.{i}")
        optimizers.probe(cls, defaults, group_opts, dtypes, device, fields)
        sched_spec = schedulers.parse_spec(scheduler) if scheduler is not None else None
        if sched_spec is not None:
            def make_probe() -> torch.optim.Optimizer:
                tiny = []
                for opts, dtype in zip(group_opts, dtypes, strict=True):
                    t = torch.full((2, 2), 0.5, dtype=dtype, device=device)
                    t.grad = torch.full_like(t, 0.25)
                    tiny.append({"params": [t], **opts})
                return cls(tiny, **defaults)
            schedulers.probe(sched_spec, make_probe, "scheduler")

        params: dict[str, torch.Tensor] = {}
        torch_groups = []
        for group, opts in zip(groups, group_opts, strict=True):
            named = []
            for name, t in group.params.items():
                p = t.detach().to(device=device, copy=True).contiguous()
                params[name] = p
                named.append((name, p))
            # an empty group says it is named (torch refuses to mix named and unnamed groups)
            torch_groups.append({"params": named, **opts} if named else
                                {"params": [], "param_names": [], **opts})
        try:
            optimizer = cls(torch_groups, **defaults)
        except optimizers.TORCH_ERRORS as exc:
            raise Invalid(str(exc), code="invalid_option",
                          field=optimizers.blame(str(exc), fields, "options")) from None
        session = cls_(session_id, optimizer_name, cls, optimizer, params, defaults, device,
                       nonfinite)
        if sched_spec is not None:
            session.scheduler = schedulers.build(sched_spec, optimizer, "scheduler")
            session.scheduler_spec = sched_spec
        session.group_spec_options = [dict(g.options) for g in groups]
        return session

    # ----------------------------------------------------------------- views
    def names(self) -> list[str]:
        return [n for g in self.optimizer.param_groups for n in g["param_names"]]

    def lrs(self) -> list[float]:
        return [lr_value(g["lr"]) for g in self.optimizer.param_groups]

    def group_options(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                for g in self.optimizer.param_groups]

    def group_dtypes(self) -> list[torch.dtype]:
        return [g["params"][0].dtype if g["params"] else EMPTY_GROUP_DTYPE
                for g in self.optimizer.param_groups]

    def steps_scheduler(self) -> bool:
        """Whether every optimizer step also steps the scheduler."""
        return self.scheduler is not None and self.scheduler_spec is not None \
            and self.scheduler_spec.step_on == "optimizer"

    def describe(self) -> SessionInfo:
        groups = []
        for g in self.optimizer.param_groups:
            opts = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            groups.append({**state_dicts.jsonable_options(opts), "params": list(g["param_names"])})
        sched = None
        if self.scheduler_spec is not None:
            sched = {**self.scheduler_spec.to_json(),
                     "last_epoch": getattr(self.scheduler, "last_epoch", None)}
        return SessionInfo(
            id=self.id, optimizer=self.optimizer_name, device=str(self.device),
            version=self.version, step=self.step_count, lr=self.lrs(),
            nonfinite=self.nonfinite, durability=self.durability,
            defaults=state_dicts.jsonable_options(self.optimizer.defaults),
            param_groups=groups,
            params={n: {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape)}
                    for n, p in self.params.items()},
            accumulated=sorted(self.accum), scheduler=sched, ps=self.ps.to_json(),
        )

    def memory_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.params.values())
        total += sum(a.numel() * a.element_size() for a in self.accum.values())
        for st in list(self.optimizer.state.values()):
            total += sum(v.numel() * v.element_size() for v in st.values()
                         if isinstance(v, torch.Tensor))
        return total

    # ----------------------------------------------------------------- shared checks
    def check_tensors(self, tensors: Tensors, field: str) -> None:
        """Names, dtypes and shapes of tensors sent for this session's parameters."""
        for name, t in tensors.items():
            p = self.params.get(name)
            if p is None:
                raise Invalid(f"unknown parameter {name!r:.80}; this session has "
                              f"{', '.join(repr(n) for n in list(self.params)[:20])}",
                              code="unknown_parameter", field=f"{field}.{name}")
            if t.dtype != p.dtype:
                raise Invalid(f"{name!r:.80} is {DTYPE_NAMES[p.dtype]} but the tensor sent is "
                              f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} (no silent casts)",
                              code="dtype_mismatch", field=f"{field}.{name}")
            if t.shape != p.shape:
                raise Invalid(f"{name!r:.80} has shape {list(p.shape)} but the tensor sent has "
                              f"{list(t.shape)}", code="shape_mismatch", field=f"{field}.{name}")

    @staticmethod
    def nonfinite_names(tensors: Tensors) -> list[str]:
        if not tensors:
            return []
        # A sum is finite only when every element is (NaN and infinities propagate), and it
        # costs a fraction of isfinite().all() (no N-element mask; ~40x less on a CPU). A
        # non-finite sum may also be a finite overflow: those tensors get the exact test.
        names = list(tensors)
        sums = torch.stack([t.sum().isfinite() for t in tensors.values()]).cpu().tolist()
        suspects = [n for n, ok in zip(names, sums, strict=True) if not ok]
        if not suspects:
            return []
        flags = torch.stack([torch.isfinite(tensors[n]).all() for n in suspects]).cpu().tolist()
        return [n for n, ok in zip(suspects, flags, strict=True) if not ok]

    def reject_nonfinite(self, bad: list[str], field: str, what: str = "gradient") -> None:
        raise Invalid(f"non-finite {what} values in {', '.join(map(repr, bad[:20]))}; "
                      "this session rejects them (nonfinite: reject)",
                      code=f"nonfinite_{what}", field=f"{field}.{bad[0]}", names=bad)

    def on_device(self, tensors: Tensors) -> Tensors:
        return {n: t.to(self.device, non_blocking=False) for n, t in tensors.items()}

    def check_grads(self, grads: Tensors) -> Tensors:
        """Gradients checked (names, dtypes, shapes, the non-finite policy) and on the device;
        changes nothing."""
        self.check_tensors(grads, "grads")
        grads = self.on_device(grads)
        bad = self.nonfinite_names(grads)
        if bad and self.nonfinite == "reject":
            self.reject_nonfinite(bad, "grads")
        return grads

    def check_group_scalars(self) -> None:
        """Every numeric group option must fit the dtype of the group's parameters (torch
        raises "value cannot be converted ... without overflow" mid-step otherwise)."""
        for i, (g, dtype) in enumerate(zip(self.group_options(), self.group_dtypes(),
                                           strict=True)):
            optimizers.check_overflow(g, dtype, f"param_groups.{i}")

    def check_names(self, names: list[str] | None) -> None:
        if names is not None:
            for n in names:
                if n not in self.params:
                    raise Invalid(f"unknown parameter {n!r:.80}", code="unknown_parameter",
                                  field=f"names.{n}")

    def pack_params(self, names: list[str] | None = None) -> PackedTensors:
        """CPU copies later steps cannot change, packed in one buffer (one copy in all, and
        none more to send them as safetensors)."""
        chosen = self.params if names is None else {n: self.params[n] for n in names}
        return pack(chosen)

    # ----------------------------------------------------------------- persistence
    def snapshot_tree(self) -> dict[str, Any]:
        """Everything needed to rebuild this session exactly (tensors by reference: encode it
        before anything else changes the session)."""
        sd: dict[str, Any] = dict(self.optimizer.state_dict())
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return {
            "meta": {
                "id": self.id,
                "optimizer": self.optimizer_name,
                "defaults": self.defaults,
                "groups": [list(g["param_names"]) for g in self.optimizer.param_groups],
                "scheduler": self.scheduler_spec.to_json() if self.scheduler_spec else None,
                "nonfinite": self.nonfinite,
                "durability": self.durability,
                "version": self.version,
                "step": self.step_count,
                "seq": self.seq,
                "ps": self.ps.to_json(),
                "idempotency": self.idem.to_json(),
                "created_by": list(self.created_by) if self.created_by else None,
                "group_options": self.group_spec_options,
                # torch's load_state_dict adds keys to optimizer.defaults (differentiable):
                # a restore puts back exactly the keys the running optimizer had
                "defaults_keys": list(self.optimizer.defaults),
            },
            "state_dict": sd,
            "params": dict(self.params),
            "accum": dict(self.accum),
        }

    @classmethod
    def restore(cls_, tree: dict[str, Any], device: torch.device) -> Session:
        """Rebuild a session from :meth:`snapshot_tree` (decoded)."""
        meta, sd = tree["meta"], tree["state_dict"]
        # Re-create with the options the groups were made with (validated then; the first
        # snapshot format lacks them: the defaults are as valid), then load the state dict,
        # which restores every group key exactly, whatever its running value.
        spec_options = meta.get("group_options") or [{} for _ in meta["groups"]]
        groups = [GroupSpec({n: tree["params"][n] for n in names}, dict(opts))
                  for names, opts in zip(meta["groups"], spec_options, strict=True)]
        session = cls_.build(meta["id"], meta["optimizer"], groups, meta["defaults"],
                             meta["scheduler"], meta["nonfinite"], device,
                             allow_empty=not all(meta["groups"]))
        # JSON keys are strings (torch's state ids are ints), JSON lists are tuples where the
        # constructor's default is one (betas, etas, ...)
        state = {int(k): v for k, v in sd["state"].items()}
        tuples = {k for k, v in optimizers.default_options(session.cls).items()
                  if isinstance(v, tuple)}
        saved_groups = [{k: tuple(v) if k in tuples and isinstance(v, list) else v
                         for k, v in g.items()} for g in sd["param_groups"]]
        session.optimizer.load_state_dict({"state": state, "param_groups": saved_groups})
        for group, names in zip(session.optimizer.param_groups, meta["groups"], strict=True):
            group["param_names"] = list(names)
        if meta.get("defaults_keys") is not None:
            keep = set(meta["defaults_keys"])
            for key in [k for k in session.optimizer.defaults if k not in keep]:
                del session.optimizer.defaults[key]
        if session.scheduler is not None and sd.get("scheduler") is not None:
            session.scheduler.load_state_dict(sd["scheduler"])
        session.durability = meta["durability"]
        session.version = int(meta["version"])
        session.step_count = int(meta["step"])
        session.seq = session.seq_at_snapshot = int(meta["seq"])
        session.ps = ps.parse(meta.get("ps") or {})
        session.idem = IdempotencyTable.from_json(meta.get("idempotency"))
        created = meta.get("created_by")
        session.created_by = (str(created[0]), str(created[1])) if created else None
        session.accum = {n: t.to(device=device, copy=True) for n, t in tree["accum"].items()}
        return session


def check_param_tensor(name: str, t: torch.Tensor, field: str) -> None:
    """A parameter the client sends: a floating, finite-size, plain (strided CPU) tensor."""
    if t.layout != torch.strided or t.device.type != "cpu":
        raise Invalid(f"{name!r:.60} must be a dense tensor", code="invalid_tensor", field=field)
    if not t.is_floating_point():
        raise Invalid(f"parameters must be floating point, {name!r:.60} is "
                      f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))}",
                      code="invalid_dtype", field=field)
