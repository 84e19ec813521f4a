"""``optimizer.step()`` without torch's profiler annotation while no profiler is on.

torch wraps every optimizer class's ``step`` once (``Optimizer.profile_hook_step``): the
wrapper opens a ``record_function`` range named ``Optimizer.step#Adam.step`` for a profiler,
runs the global and the optimizer's own step pre-hooks, the step, ``_optimizer_step_code``
(the profiler's entry point) and the post-hooks. With no profiler on, the range records
nothing, yet entering and leaving it was a twentieth of the server's time per step of a
small session (two calls into torch's dispatcher and a CUPTI check, about 30 µs).

:func:`step` calls what that wrapper wraps, then ``_optimizer_step_code``, when the wrapper
would do nothing else: torch's own wrapper is the class's ``step`` (no subclass replaced it,
nothing patched the instance's: an LR scheduler's step counter does, and is then called as
ever), no step hook of any kind is registered, and no profiler is on in this thread. In
every other case it is ``optimizer.step()``. The values are the same: the wrapped function
is the step itself.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.optim import optimizer as torch_optimizer


@functools.cache
def _wrapper_code() -> Any:
    """The code object of torch's ``profile_hook_step`` wrapper (one for every class)."""
    return torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def _wrapped(fn: Any) -> Any:
    """What ``fn`` wraps when it is torch's profiler wrapper, else None."""
    code = getattr(fn, "__code__", None)
    if code is not _wrapper_code() or fn.__closure__ is None:
        return None
    return fn.__closure__[code.co_freevars.index("func")].cell_contents


def _hooked(opt: torch.optim.Optimizer) -> bool:
    """Some step hook would run: global ones, or the optimizer's own."""
    return bool(torch_optimizer._global_optimizer_pre_hooks
                or torch_optimizer._global_optimizer_post_hooks
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)


def step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` (no closure), without the profiler range when that is all it adds."""
    inner = None if "step" in vars(opt) else _wrapped(type(opt).step)
    if inner is None or _hooked(opt) or torch._C._autograd._profiler_enabled():
        opt.step()
        return
    inner(opt)
    opt._optimizer_step_code()
