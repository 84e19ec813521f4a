"""Expected values for the JS client tests and the curl examples, from in-process torch.optim.

Never committed: floats depend on the CPU torch runs on (its kernel choice, see
ATEN_CPU_CAPABILITY), so expected values are computed at test time by the server's torch on the
machine that runs the tests. scripts/test-clients runs this once per run into a temporary file
and names it in OPTSERVE_REFERENCE; without that variable the JS test helper and the curl
examples run it themselves (with OPTSERVE_PYTHON, default .venv/bin/python).

Run:  .venv/bin/python clients/js/test/make_reference.py > /tmp/expected.json

Every float is written twice: as a JSON number (the exact value of the float32/float64, which
a JS Float32Array/Float64Array stores back bit for bit) and as its raw bits in hex, so a test
can compare bit-exactly. Gradients that do not depend on the parameters are in the fixture too,
so the tests send exactly what torch saw. "cpu_capability" records the kernels torch used.
"""

from __future__ import annotations

import json
import math
import struct
import sys

import torch


def bits(t: torch.Tensor) -> list[str]:
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.float32:
        return [f"{struct.unpack('<I', struct.pack('<f', v))[0]:08x}" for v in flat.tolist()]
    if flat.dtype == torch.float64:
        return [f"{struct.unpack('<Q', struct.pack('<d', v))[0]:016x}" for v in flat.tolist()]
    raise TypeError(flat.dtype)


def vec(t: torch.Tensor) -> dict:
    t = t.detach()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.reshape(-1).tolist(), "bits": bits(t)}


def seed_lr1() -> dict:
    """f(x) = 4x^2, x0 = 2, SGD lr=1: x1 = -14, x2 = 98."""
    x = torch.tensor([2.0], requires_grad=True)
    opt = torch.optim.SGD([x], lr=1)
    xs = []
    for _ in range(2):
        opt.zero_grad()
        (4 * x**2).sum().backward()
        opt.step()
        xs.append(vec(x))
    return {"x0": 2.0, "steps": xs}


def seed_momentum(steps: int = 12) -> dict:
    """f(x) = 4x^2, x0 = 2, SGD lr=0.1 momentum=0.9, StepLR(step_size=10, gamma=0.1).

    The gradient 8x is exact in float32 (a power-of-two scaling), so a client computing it
    as Math.fround(8 * x) sends exactly what autograd gave torch."""
    x = torch.tensor([2.0], requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (4 * x**2).sum().backward()
        assert torch.equal(x.grad, 8 * x.detach())
        opt.step()
        sched.step()
        out.append({"x": vec(x), "lr": opt.param_groups[0]["lr"]})
    return {"x0": 2.0, "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
            "scheduler": {"name": "StepLR", "options": {"step_size": 10, "gamma": 0.1}},
            "steps": out}


def run_fixed(opt_name: str, options: dict, params: dict[str, torch.Tensor], n: int,
              seed: int) -> dict:
    """An optimizer over named params fed fixed (recorded) gradients for n steps."""
    gen = torch.Generator().manual_seed(seed)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = getattr(torch.optim, opt_name)(list(live.values()), **options)
    steps = []
    for _ in range(n):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in live.items()}
        for k, p in live.items():
            p.grad = grads[k].clone()
        opt.step()
        steps.append({"grads": {k: vec(g) for k, g in grads.items()},
                      "params": {k: vec(p) for k, p in live.items()}})
    sd = opt.state_dict()
    state = {}
    for i, name in enumerate(live):
        state[name] = {k: vec(v) for k, v in sd["state"][i].items() if torch.is_tensor(v)}
    return {"optimizer": opt_name, "options": options,
            "params0": {k: vec(v) for k, v in params.items()}, "steps": steps,
            "final_state": state}


def half_bits(t: torch.Tensor) -> list[int]:
    """A bfloat16/float16 tensor's raw 16-bit patterns (what the JS client's Uint16Array
    holds)."""
    return t.detach().reshape(-1).view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()


def adam_bf16(n: int = 4) -> dict:
    """Adam on float32 parameters fed bfloat16 gradients (widened on the server:
    ``upcast``), the answers narrowed back to bfloat16 (``params_dtype``): the raw bits of
    each step's gradients and narrowed answer, and the float32 master weights after each."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, generator=gen).requires_grad_(True)
    w0 = w.detach().clone()
    opt = torch.optim.Adam([w], lr=0.02)
    steps = []
    for _ in range(n):
        g = torch.randn(6, generator=gen).bfloat16()
        w.grad = g.float()
        opt.step()
        steps.append({"grad_bits": half_bits(g), "answer_bits": half_bits(w.detach().bfloat16()),
                      "master": vec(w)})
    return {"optimizer": "Adam", "options": {"lr": 0.02}, "w0": vec(w0), "steps": steps}


def sparse_adam() -> dict:
    """SparseAdam on a [10, 3] table fed fixed row-sparse gradients (duplicates, an empty
    batch): the touched rows after each step and the whole table at the end."""
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(10, 3, generator=gen)
    batches = [[1, 4, 1], [9], [], [0, 4, 4, 7]]
    live = table.clone().requires_grad_(True)
    opt = torch.optim.SparseAdam([live], lr=0.05, betas=(0.8, 0.95))
    steps = []
    for rows in batches:
        values = torch.randn(len(rows), 3, generator=gen)
        live.grad = torch.sparse_coo_tensor(torch.tensor(rows, dtype=torch.int64).reshape(1, -1),
                                            values, (10, 3), check_invariants=False)
        opt.step()
        touched = sorted(set(rows))
        steps.append({"rows": rows, "values": vec(values), "touched": touched,
                      "touched_values": vec(live.detach()[touched])})
    return {"options": {"lr": 0.05, "betas": [0.8, 0.95]}, "table0": vec(table),
            "steps": steps, "table": vec(live)}


def quadratic(x: list[float]) -> tuple[float, list[float]]:
    """f(x) = 4 x0^2 + 0.5 x1^2 + x0 x1 and its gradient, in float64 operations a JS client
    performs identically (left to right): the same bits on both sides."""
    x0, x1 = x
    return 4 * x0 * x0 + 0.5 * x1 * x1 + x0 * x1, [8 * x0 + x1, x1 + x0]


def lbfgs(options: dict, steps: int = 3) -> dict:
    """LBFGS (float64) on the quadratic above from (1.5, -2), its closure computing the loss
    and gradient as the JS test does."""
    x = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], **options)
    out = []
    for _ in range(steps):
        calls = 0

        def closure() -> float:
            nonlocal calls
            calls += 1
            loss, grad = quadratic(x.detach().tolist())
            x.grad = torch.tensor(grad, dtype=torch.float64)
            return loss
        loss = opt.step(closure)
        out.append({"x": vec(x), "loss": loss, "evaluations": calls})
    return {"options": options, "x0": [1.5, -2.0], "steps": out}


def half_rounding() -> dict:
    """Doubles that are not float16/bfloat16 values, near the ties between two of them (and
    where a direct rounding and torch's differ), with the raw bits torch makes of each:
    torch converts a Python float to a half type through float32."""
    values = [1 + 2**-11 + 2**-40, 1 - 2**-12 - 2**-42, 2**-24 * (1.5 + 2**-30),
              2**-14 * (1 + 2**-11 + 2**-35), 65504 + 16 - 2**-20, 0.1, -1 / 3,
              1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 3.0000001]
    return {"values": values,
            "float16": half_bits(torch.tensor(values, dtype=torch.float16)),
            "bfloat16": half_bits(torch.tensor(values, dtype=torch.bfloat16))}


def asgd_t0_inf() -> dict:
    """ASGD with t0 = inf (never average: +inf is a meaningful option there), fed fixed
    gradients. The options are left out (JSON has no infinity): the test gives them."""
    out = run_fixed("ASGD", {"lr": 0.05, "t0": math.inf},
                    {"x": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)}, n=3, seed=3)
    del out["options"]
    return out


def adam_tensor_lr() -> dict:
    """Adam over float32 parameters with a tensor lr (float32 scalars, as a client sends them):
    0.01 at create, 0.02 from the third step (a PATCH), 0.005 with the fourth (the step's option
    changes), fed fixed gradients. The lrs are given as vectors (a tensor is not JSON)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.tensor([0.5, -1.25, 2.0, 0.125])  # (the session's: no autograd)
    lrs = [torch.tensor(v, dtype=torch.float32) for v in (0.01, 0.01, 0.02, 0.005)]
    opt = torch.optim.Adam([p], lr=lrs[0].clone())
    params0 = vec(p)
    steps = []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr.clone()
        g = torch.randn(p.shape, generator=gen)
        p.grad = g.clone()
        opt.step()
        steps.append({"lr": vec(lr.reshape(1)), "grads": {"w": vec(g)}, "params": {"w": vec(p)}})
    return {"optimizer": "Adam", "params0": {"w": params0}, "steps": steps}


def plateau_nonfinite() -> dict:
    """ReduceLROnPlateau(patience=0, factor=0.5) over SGD(lr=1) stepped on the metrics 1, 2,
    NaN, +inf, -inf, 3 (a NaN is never better: a bad epoch, as is +inf; -inf becomes best):
    the lr after each. Metrics are named as strings (JSON has no NaN)."""
    opt = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    names = ["1", "2", "nan", "inf", "-inf", "3"]
    lrs = []
    for name in names:
        sched.step(float(name))
        lrs.append(sched.get_last_lr()[0])
    return {"metrics": names, "lrs": lrs}


def main() -> None:
    torch.use_deterministic_algorithms(True)
    ref = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seed_lr1": seed_lr1(),
        "seed_momentum": seed_momentum(),
        "adam": run_fixed(
            "Adam", {"lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.01},
            {"w": torch.tensor([[0.5, -1.25, 2.0], [0.1, 0.0, -3.0]], dtype=torch.float32),
             "b": torch.tensor([0.25, -0.5, 1.0], dtype=torch.float32)},
            n=5, seed=0),
        "adamw_f64": run_fixed(
            "AdamW", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True},
            {"v": torch.tensor([1.0, -2.0, 0.3, 4.5], dtype=torch.float64)},
            n=4, seed=1),
        "adam_bf16": adam_bf16(),
        "half_rounding": half_rounding(),
        "asgd_t0_inf": asgd_t0_inf(),
        "adam_tensor_lr": adam_tensor_lr(),
        "plateau_nonfinite": plateau_nonfinite(),
        "sparse_adam": sparse_adam(),
        "lbfgs": lbfgs({"lr": 1, "max_iter": 6, "history_size": 3}),
        "lbfgs_wolfe": lbfgs({"lr": 1, "max_iter": 8, "history_size": 4,
                              "line_search_fn": "strong_wolfe"}),
    }
    json.dump(ref, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
