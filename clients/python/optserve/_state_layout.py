"""The memory layout torch's optimizer keeps each parameter's state in.

torch makes a parameter's per-element state (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
``momentum_buffer``, Adagrad's ``sum``, RMSprop's, Adadelta's, Adamax's, NAdam's, RAdam's,
ASGD's ``ax``, Rprop's ``prev``/``step_size``, Muon's, Adafactor's ``variance``) as
``torch.zeros_like(p, memory_format=torch.preserve_format)`` (or from ``p.grad``, which
autograd lays out as ``p``): a parameter in ``torch.channels_last``, or any other dense
strides (a transposed weight), has its state in those same strides. The session's state
travels contiguous (safetensors and JSON hold no strides), so ``RemoteOptimizer.state`` and
``state_dict()`` lay each tensor of its parameter's shape out as torch's would be: the same
values, the strides ``zeros_like(p, memory_format=torch.preserve_format)`` gives (a
contiguous parameter's state, the common case, is left as it came: nothing is copied).

The parameters themselves keep their strides: a step's new values are copied into them in
place (``RemoteOptimizer._copy_in``); an imported state's tensors may have any strides (they
travel contiguous, the values are what counts).
"""

from __future__ import annotations

from typing import Any

import torch


def laid_out_as_torch(p: torch.Tensor, entry: Any) -> Any:
    """``entry`` (the session's state of ``p``: a dict of its keys) with each strided tensor
    of ``p``'s shape in the strides torch's optimizer would keep it in (changed in place, and
    returned)."""
    if not isinstance(entry, dict) or p.layout != torch.strided:
        return entry
    for key, value in entry.items():
        if (isinstance(value, torch.Tensor) and value.layout == torch.strided
                and value.shape == p.shape and value.stride() != p.stride()):
            # (p's own strides when they are dense, else the format torch suggests for it)
            laid = torch.empty_like(p, dtype=value.dtype, device=value.device,
                                    memory_format=torch.preserve_format)
            if laid.stride() != value.stride():
                entry[key] = laid.copy_(value)
    return entry
