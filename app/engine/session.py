"""One optimizer session: named parameters on the device, a real torch optimizer, an optional
scheduler and a gradient accumulator. Every method runs on the device worker's thread, validates
everything first and only then changes anything, so a refused request leaves no trace.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from app.engine import optimizers, ps, schedulers, state_dicts
from app.engine.interface import (
    Durability,
    GroupSpec,
    NonFinitePolicy,
    ParamsResult,
    StepResult,
    Tensors,
)
from app.errors import Conflict, Invalid
from app.wire.dtypes import DTYPE_NAMES
from app.wire.safetensors_body import pack

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_NAME = 512


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise Invalid("id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit", code="invalid_id", field="id")
    return session_id


def check_param_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise Invalid(f"a parameter name must be a string of 1-{MAX_NAME} characters",
                      code="invalid_name", field=field)
    return name


def _lr_value(lr: Any) -> float:
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
        self.seq = 0  # records logged for this session, ever (persistence)
        self.seq_at_snapshot = 0
        self.snapshot_time = 0.0

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls_,
        session_id: str,
        optimizer_name: str,
        groups: list[GroupSpec],
        options: dict[str, Any],
        scheduler: dict[str, Any] | None,
        nonfinite: NonFinitePolicy,
        device: torch.device,
    ) -> Session:
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
            if not group.params:
                raise Invalid("a param group needs at least one parameter",
                              code="invalid_params", field=f"{where}.params")
            for name, t in group.params.items():
                check_param_name(name, f"{where}.params")
                if name in seen:
                    raise Invalid(f"parameter {name!r:.60} appears twice", code="invalid_params",
                                  field=f"{where}.params.{name}")
                seen.add(name)
                if not t.is_floating_point():
                    raise Invalid(f"parameters must be floating point, {name!r:.60} is "
                                  f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))}",
                                  code="invalid_dtype", field=f"{where}.params.{name}")
            dtypes.append(next(iter(group.params.values())).dtype)
        fields = {k: f"options.{k}" for k in defaults}
        for i, g in enumerate(group_opts):
            fields.update({k: f"param_groups.{i}.{k}" for k in g})
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
            torch_groups.append({"params": named, **opts})
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
        return session

    # ----------------------------------------------------------------- views
    def names(self) -> list[str]:
        return [n for g in self.optimizer.param_groups for n in g["param_names"]]

    def lrs(self) -> list[float]:
        return [_lr_value(g["lr"]) for g in self.optimizer.param_groups]

    def describe(self) -> dict[str, Any]:
        groups = []
        for g in self.optimizer.param_groups:
            opts = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            groups.append({**state_dicts.jsonable_options(opts), "params": list(g["param_names"])})
        sched = None
        if self.scheduler_spec is not None:
            sched = {**self.scheduler_spec.to_json(),
                     "last_epoch": getattr(self.scheduler, "last_epoch", None)}
        return {
            "id": self.id,
            "optimizer": self.optimizer_name,
            "device": str(self.device),
            "version": self.version,
            "step": self.step_count,
            "lr": self.lrs(),
            "nonfinite": self.nonfinite,
            "durability": self.durability,
            "defaults": state_dicts.jsonable_options(self.optimizer.defaults),
            "param_groups": groups,
            "params": {n: {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape)}
                       for n, p in self.params.items()},
            "accumulated": sorted(self.accum),
            "scheduler": sched,
            **self.ps.to_json(),
        }

    # ----------------------------------------------------------------- gradients
    def _check_tensors(self, tensors: Tensors, field: str) -> None:
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
    def _nonfinite(tensors: Tensors) -> list[str]:
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

    def _on_device(self, tensors: Tensors) -> Tensors:
        return {n: t.to(self.device, non_blocking=False) for n, t in tensors.items()}

    def check_grads(self, grads: Tensors) -> Tensors:
        """Gradients checked (names, dtypes, shapes, the non-finite policy) and on the device;
        changes nothing."""
        self._check_tensors(grads, "grads")
        grads = self._on_device(grads)
        bad = self._nonfinite(grads)
        if bad and self.nonfinite == "reject":
            raise Invalid(f"non-finite gradient values in {', '.join(map(repr, bad[:20]))}; "
                          "this session rejects them (nonfinite: reject)",
                          code="nonfinite_gradient", field=f"grads.{bad[0]}", names=bad)
        return grads

    def push(self, grads: Tensors) -> None:
        """Add gradients into the accumulator (several pushes make one step)."""
        grads = self.check_grads(grads)
        for name, g in grads.items():
            if name in self.accum:
                self.accum[name].add_(g)
            else:
                self.accum[name] = g.clone()

    def zero_grad(self) -> None:
        self.accum.clear()

    def staleness(self, base_version: int) -> int:
        """How many versions old gradients computed at ``base_version`` are; 409 past
        ``max_staleness``."""
        if not 0 <= base_version <= self.version:
            raise Invalid(f"base version {base_version} is not a version of this session "
                          f"(it is at version {self.version})", code="invalid_base_version",
                          field="base_version", current_version=self.version)
        staleness = self.version - base_version
        bound = self.ps.max_staleness
        if bound is not None and staleness > bound:
            note = ps.staleness_note(base_version, self.version, bound)
            raise Conflict(f"stale gradients refused: {note}; pull the parameters and push again",
                           code="stale_gradient", field="base_version",
                           current_version=self.version, base_version=base_version,
                           staleness=staleness, max_staleness=bound)
        return staleness

    def configure(self, options: dict[str, Any]) -> None:
        """Change parameter-server options (``sync``, ``max_staleness``, ``staleness_lr``)."""
        self.ps = ps.parse(options, self.ps)

    def step(self, grads: Tensors, return_params: bool, lr_div: float | None = None
             ) -> StepResult:
        """One optimizer step. ``lr_div`` divides every group's lr for this step only (the
        staleness scaling); the groups' own values are put back right after ``step()``."""
        if lr_div is not None and not (math.isfinite(lr_div) and lr_div >= 1.0):
            raise Invalid("lr_div must be a finite number >= 1", code="invalid_option",
                          field="lr_div")
        self._check_tensors(grads, "grads")
        if self.scheduler is not None and self.scheduler_spec is not None \
                and self.scheduler_spec.step_on == "optimizer":
            schedulers.check_can_step(self.scheduler)
        grads = self._on_device(grads)
        total: Tensors = {}
        for name in self.params:
            a, g = self.accum.get(name), grads.get(name)
            if a is not None and g is not None:
                total[name] = a + g
            elif a is not None:
                total[name] = a
            elif g is not None:
                total[name] = g
        bad = self._nonfinite(total)
        if bad and self.nonfinite == "reject":
            raise Invalid(f"non-finite gradient values in {', '.join(map(repr, bad[:20]))}; "
                          "this session rejects them (nonfinite: reject)",
                          code="nonfinite_gradient", field=f"grads.{bad[0]}", names=bad)
        if bad and self.nonfinite == "skip":
            self.accum.clear()
            return StepResult(self.version, self.step_count, self.lrs(), skipped=True,
                              nonfinite=bad,
                              params=self._snapshot_params(None) if return_params else None)
        self._check_group_scalars()
        for name, p in self.params.items():
            p.grad = total.get(name)
        saved_lrs = [group["lr"] for group in self.optimizer.param_groups]
        try:
            if lr_div is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = group["lr"] / lr_div
            self.optimizer.step()
        except optimizers.TORCH_ERRORS as exc:
            # Unreachable for inputs the checks above know of; torch may still refuse a
            # combination nobody foresaw. Say so as the client's problem, not a crash.
            raise Invalid(f"torch refused this step: {exc}", code="step_failed",
                          field="param_groups") from None
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved_lrs, strict=True):
                group["lr"] = lr
            for p in self.params.values():
                p.grad = None
        if self.scheduler is not None and self.scheduler_spec is not None \
                and self.scheduler_spec.step_on == "optimizer":
            self.scheduler.step()
        self.accum.clear()
        self.version += 1
        self.step_count += 1
        return StepResult(self.version, self.step_count, self.lrs(), nonfinite=bad,
                          params=self._snapshot_params(None) if return_params else None)

    def _check_group_scalars(self) -> None:
        """Every numeric group option must fit the dtype of the group's parameters (torch
        raises "value cannot be converted ... without overflow" mid-step otherwise, e.g. when
        a scheduler has driven lr past float32)."""
        for i, g in enumerate(self.optimizer.param_groups):
            finfo = torch.finfo(g["params"][0].dtype)
            for key, value in g.items():
                values = value if isinstance(value, tuple) else (value,)
                for v in values:
                    if type(v) is float and math.isfinite(v) and abs(v) > finfo.max:
                        raise Invalid(f"param group {i}'s {key} is {v!r}, beyond the range of "
                                      f"its parameters' dtype ({finfo.dtype}); the step would "
                                      "overflow", code="option_overflow",
                                      field=f"param_groups.{i}.{key}")

    # ----------------------------------------------------------------- parameters
    def _snapshot_params(self, names: list[str] | None) -> Tensors:
        """CPU copies later steps cannot change, packed in one buffer (one copy in all, and
        none more to send them as safetensors)."""
        chosen = self.params if names is None else {n: self.params[n] for n in names}
        return pack(chosen)

    def check_names(self, names: list[str] | None) -> None:
        if names is not None:
            for n in names:
                if n not in self.params:
                    raise Invalid(f"unknown parameter {n!r:.80}", code="unknown_parameter",
                                  field=f"names.{n}")

    def pull(self, names: list[str] | None) -> ParamsResult:
        self.check_names(names)
        return ParamsResult(self.version, self.step_count, self.lrs(),
                            self._snapshot_params(names))

    def overwrite(self, params: Tensors) -> ParamsResult:
        self._check_tensors(params, "params")
        if not params:
            raise Invalid("give at least one parameter", code="invalid_params", field="params")
        on_device = self._on_device(params)
        bad = self._nonfinite(on_device)
        if bad and self.nonfinite != "allow":
            raise Invalid(f"non-finite values in {', '.join(map(repr, bad[:20]))}",
                          code="nonfinite_parameter", field=f"params.{bad[0]}", names=bad)
        with torch.no_grad():
            for name, t in on_device.items():
                self.params[name].copy_(t)
        self.version += 1
        return ParamsResult(self.version, self.step_count, self.lrs(),
                            self._snapshot_params(list(params)))

    # ----------------------------------------------------------------- param groups
    def _group_options(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                for g in self.optimizer.param_groups]

    def _group_dtypes(self) -> list[torch.dtype]:
        return [g["params"][0].dtype for g in self.optimizer.param_groups]

    def add_param_group(self, group: GroupSpec) -> None:
        index = len(self.optimizer.param_groups)
        where = f"param_groups.{index}"
        opts = optimizers.normalize_options(self.cls, group.options, where)
        if not group.params:
            raise Invalid("a param group needs at least one parameter", code="invalid_params",
                          field=f"{where}.params")
        for name, t in group.params.items():
            check_param_name(name, f"{where}.params")
            if name in self.params:
                raise Invalid(f"parameter {name!r:.60} is already in this session",
                              code="invalid_params", field=f"{where}.params.{name}")
            if not t.is_floating_point():
                raise Invalid(f"parameters must be floating point, {name!r:.60} is "
                              f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))}",
                              code="invalid_dtype", field=f"{where}.params.{name}")
        dtype = next(iter(group.params.values())).dtype
        fields = {k: f"{where}.{k}" for k in opts}
        current = self._group_options()
        optimizers.probe(self.cls, self.defaults, [*current, opts],
                         [*self._group_dtypes(), dtype], self.device, fields, where,
                         baseline=current)
        named = []
        new_params = {}
        for name, t in group.params.items():
            p = t.detach().to(device=self.device, copy=True).contiguous()
            new_params[name] = p
            named.append((name, p))
        try:
            self.optimizer.add_param_group({"params": named, **opts})
        except optimizers.TORCH_ERRORS as exc:
            raise Invalid(str(exc), code="invalid_option",
                          field=optimizers.blame(str(exc), fields, where)) from None
        self.params.update(new_params)

    def update_param_group(self, index: int, options: dict[str, Any]) -> None:
        groups = self.optimizer.param_groups
        if not 0 <= index < len(groups):
            raise Invalid(f"param group {index} does not exist; this session has {len(groups)}",
                          code="unknown_param_group", field="index")
        current = self._group_options()
        extra = {k: v for k, v in current[index].items()}
        opts = optimizers.normalize_options(self.cls, options, f"param_groups.{index}", extra)
        proposed = [dict(g) for g in current]
        proposed[index].update(opts)
        fields = {k: f"param_groups.{index}.{k}" for k in opts}
        optimizers.probe(self.cls, self.defaults, proposed, self._group_dtypes(), self.device,
                         fields, f"param_groups.{index}", baseline=current)
        groups[index].update(opts)

    # ----------------------------------------------------------------- scheduler
    def scheduler_step(self, metric: float | None) -> None:
        if self.scheduler is None or self.scheduler_spec is None:
            raise Invalid("this session has no scheduler", code="no_scheduler",
                          field="scheduler")
        is_plateau = self.scheduler_spec.name == "ReduceLROnPlateau"
        if is_plateau and metric is None:
            raise Invalid("ReduceLROnPlateau steps on a metric: send {\"metric\": x}",
                          code="missing_metric", field="metric")
        if not is_plateau and metric is not None:
            raise Invalid(f"{self.scheduler_spec.name} takes no metric", code="invalid_metric",
                          field="metric")
        if metric is not None and not math.isfinite(metric):
            raise Invalid("metric must be a finite number", code="invalid_metric",
                          field="metric")
        schedulers.check_can_step(self.scheduler)
        if is_plateau:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    # ----------------------------------------------------------------- state dicts
    def export_state(self) -> dict[str, Any]:
        sd = state_dicts.detach_tree(self.optimizer.state_dict())
        if self.scheduler is not None:
            sd["scheduler"] = state_dicts.detach_tree(self.scheduler.state_dict())
        return dict(sd)

    def import_state(self, state: dict[str, Any]) -> None:
        prepared = state_dicts.prepare_import(self, state)
        self.optimizer.load_state_dict(prepared.optimizer)
        for group, names in zip(self.optimizer.param_groups, prepared.names, strict=True):
            group["param_names"] = names
        if prepared.scheduler is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(prepared.scheduler)
        self.version += 1

    # ----------------------------------------------------------------- persistence
    def snapshot_tree(self) -> dict[str, Any]:
        """Everything needed to rebuild this session exactly (tensors by reference: encode it
        before anything else runs on the worker)."""
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
            },
            "state_dict": sd,
            "params": dict(self.params),
            "accum": dict(self.accum),
        }

    @classmethod
    def restore(cls_, tree: dict[str, Any], device: torch.device) -> Session:
        """Rebuild a session from :meth:`snapshot_tree` (decoded)."""
        meta, sd = tree["meta"], tree["state_dict"]
        groups = []
        # Re-create with constructor options only (AdamW's groups also carry Adam's
        # decoupled_weight_decay, which AdamW's constructor does not take); import_state then
        # restores every group key exactly.
        ctor = optimizers.default_options(optimizers.optimizer_class(meta["optimizer"]))
        for names, g in zip(meta["groups"], sd["param_groups"], strict=True):
            opts = {k: v for k, v in g.items() if k in ctor}
            groups.append(GroupSpec({n: tree["params"][n] for n in names}, opts))
        session = cls_.create(meta["id"], meta["optimizer"], groups, meta["defaults"],
                              meta["scheduler"], meta["nonfinite"], device)
        session.import_state(sd)
        session.durability = meta["durability"]
        session.version = int(meta["version"])
        session.step_count = int(meta["step"])
        session.seq = session.seq_at_snapshot = int(meta["seq"])
        session.ps = ps.parse(meta.get("ps") or {})
        session.accum = {n: t.to(device=device, copy=True) for n, t in tree["accum"].items()}
        return session

    def apply(self, op: str, args: dict[str, Any]) -> None:
        """Replay one logged update (the same method the original request ran)."""
        if op == "step":
            lr_div = args.get("lr_div")
            self.step(args["grads"], False, None if lr_div is None else float(lr_div))
        elif op == "push":
            self.push(args["grads"])
        elif op == "zero_grad":
            self.zero_grad()
        elif op == "overwrite":
            self.overwrite(args["params"])
        elif op == "add_group":
            self.add_param_group(GroupSpec(args["params"], args["options"]))
        elif op == "update_group":
            self.update_param_group(int(args["index"]), args["options"])
        elif op == "scheduler_step":
            self.scheduler_step(args["metric"])
        elif op == "import":
            self.import_state(args["state"])
        elif op == "configure":
            self.configure(args["options"])
        else:
            raise ValueError(f"unknown logged operation {op!r}")
