"""A Ray actor parameter server, the pattern of Ray's parameter-server example: an actor
holds the parameters and a torch optimizer; the worker calls ``actor.step.remote(grad)``
with a numpy gradient and ``ray.get``s the updated parameters as numpy.

Local cluster: ``ray.init(num_cpus=2, include_dashboard=False)`` with ``RAY_AUTH_MODE=disabled``
(Ray 2.60 turns token authentication on by default). One actor for the whole run (its
process stays warm); each case resets it with fresh parameters and optimizer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from benchmarks._peers.base import GradSystem, register
from benchmarks._peers.cases import Case, OptimizerSpec
from benchmarks._peers.timing import pin_torch_threads

REPO = Path(__file__).resolve().parents[2]


class ParameterServer:
    """The actor (made remote with ``ray.remote`` in the worker)."""

    def __init__(self, heap_reuse: bool) -> None:
        if heap_reuse:
            from app.runtime import tune_allocator

            tune_allocator()
        # Ray hands numpy arguments over read-only (zero-copy from its object store)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.threads = pin_torch_threads(1)

    def reset(self, spec: OptimizerSpec, initial: npt.NDArray[np.float32]) -> int:
        self.p = torch.from_numpy(initial.copy())
        self.opt = getattr(torch.optim, spec.name)([self.p], **spec.options)
        return self.threads

    def step(self, grad: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.p.grad = torch.from_numpy(grad)
        self.opt.step()
        self.p.grad = None  # let the object store free the argument
        out: npt.NDArray[np.float32] = self.p.detach().numpy()
        return out

    def step_threads(self) -> int:
        return torch.get_num_threads()

    def pid(self) -> int:
        return os.getpid()


def _daemon_pids() -> list[int]:
    """The local raylet's and GCS server's pids (private Ray API; none if it moved)."""
    try:
        from ray._private import worker

        node: Any = worker._global_node
        procs = node.all_processes
        return [info.process.pid for kind in ("raylet", "gcs_server")
                for info in procs.get(kind, [])]
    except Exception:
        return []


@register
class RayActor(GradSystem):
    name = "ray"
    requires = "ray"
    install_hint = "pip install -e '.[bench]'"

    def start(self) -> dict[str, Any]:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # the actor's process imports this module: put the repository on its path
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        import ray

        self.ray: Any = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        actor: Any = ray.remote(ParameterServer).remote(self.config.peer_heap_reuse)
        self.actor = actor
        # for the CPU accounting: the actor first, then the raylet (it holds the object
        # store) and the GCS
        pids = [ray.get(self.actor.pid.remote()), *_daemon_pids()]
        return {"ray": ray.__version__, "heap_reuse": self.config.peer_heap_reuse,
                "server_pids": pids}

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        self.arrays = [g.numpy() for g in self.grads]
        self.ray.get(self.actor.reset.remote(case.spec, initial.numpy()))
        self.last: npt.NDArray[np.float32] | None = None

    def exchange(self, grad_index: int) -> None:
        self.last = self.ray.get(self.actor.step.remote(self.arrays[grad_index]))

    def params(self) -> npt.NDArray[np.float32]:
        if self.last is None:
            raise RuntimeError("no step was taken")
        return np.array(self.last)

    def info(self) -> dict[str, Any]:
        return {"step_threads": self.ray.get(self.actor.step_threads.remote())}

    def stop(self) -> None:
        self.ray.shutdown()
