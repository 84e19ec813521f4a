"""A torch RPC parameter server (``torch.distributed.rpc``, TensorPipe backend): a second
process ("ps", rank 0) holds a ``ParameterServer`` object made with ``rpc.remote``; the worker
(rank 1) calls ``rref.rpc_sync().step(grad)`` and gets the updated parameters back as a
tensor. Both on 127.0.0.1 (``TP_SOCKET_IFNAME=lo``). Transport ``uv`` (TCP) unless
``--rpc-transports`` says otherwise, channels TensorPipe's choice unless ``--rpc-channels``
names them (for CPU tensors on one host that may be ``cma``, a ``process_vm_readv`` copy,
rather than the socket). ``torch-rpc-shm`` is TensorPipe's default transport choice (shared
memory on one host)."""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed.rpc as rpc

from benchmarks._peers.base import GradSystem, RunConfig, register
from benchmarks._peers.cases import Case, OptimizerSpec
from benchmarks._peers.timing import pin_torch_threads
from benchmarks._server import free_port

_init_rpc: Any = rpc.init_rpc  # untyped in torch
Pipes = tuple[tuple[str, ...] | None, tuple[str, ...] | None]  # (transports, channels)


class ParameterServer:
    """Lives in the "ps" process; its methods run on TensorPipe's RPC threads."""

    def __init__(self, spec: OptimizerSpec, initial: torch.Tensor) -> None:
        self.p = initial.clone()
        self.opt = getattr(torch.optim, spec.name)([self.p], **spec.options)
        self.threads = 0

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        self.threads = pin_torch_threads(1)  # RPC threads do not inherit the main thread's
        self.p.grad = grad
        self.opt.step()
        self.p.grad = None
        return self.p.detach()

    def step_threads(self) -> int:
        return self.threads


def _options(port: int, pipes: Pipes) -> Any:
    kwargs: dict[str, Any] = {"init_method": f"tcp://127.0.0.1:{port}", "rpc_timeout": 600}
    transports, channels = pipes
    if transports:
        kwargs["_transports"] = list(transports)
    if channels:
        kwargs["_channels"] = list(channels)
    return rpc.TensorPipeRpcBackendOptions(**kwargs)


def _env() -> None:
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # init_rpc's own barrier uses a Gloo group in a way torch 2.13 warns about
    warnings.filterwarnings("ignore", message="You are using a Backend .*ProcessGroupGloo")


def _serve(port: int, config: RunConfig, pipes: Pipes) -> None:
    """The "ps" process: join, serve until the worker shuts down."""
    _env()
    pin_torch_threads(1)
    if config.peer_heap_reuse:
        from app.runtime import tune_allocator

        tune_allocator()
    _init_rpc("ps", rank=0, world_size=2, rpc_backend_options=_options(port, pipes))
    rpc.shutdown()


@register
class TorchRpc(GradSystem):
    name = "torch-rpc"

    def pipes(self) -> Pipes:
        return self.config.rpc_transports, self.config.rpc_channels

    def start(self) -> dict[str, Any]:
        _env()
        port = free_port()
        pipes = self.pipes()
        self.server = mp.get_context("spawn").Process(
            target=_serve, args=(port, self.config, pipes), name="torch-rpc-ps")
        self.server.start()
        _init_rpc("worker", rank=1, world_size=2, rpc_backend_options=_options(port, pipes))
        transports, channels = pipes
        return {"server_pid": self.server.pid,
                "transports": ",".join(transports or ["(TensorPipe default)"]),
                "channels": ",".join(channels or ["(TensorPipe default)"]),
                "heap_reuse": self.config.peer_heap_reuse}

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        self.rref = rpc.remote("ps", ParameterServer, args=(case.spec, initial))
        self.last: torch.Tensor | None = None

    def exchange(self, grad_index: int) -> None:
        self.last = self.rref.rpc_sync().step(self.grads[grad_index])

    def params(self) -> npt.NDArray[np.float32]:
        if self.last is None:
            raise RuntimeError("no step was taken")
        out: npt.NDArray[np.float32] = self.last.numpy().copy()
        return out

    def info(self) -> dict[str, Any]:
        return {"step_threads": self.rref.rpc_sync().step_threads()}

    def teardown(self) -> None:
        del self.rref

    def stop(self) -> None:
        rpc.shutdown()
        self.server.join(timeout=60)


@register
class TorchRpcShm(TorchRpc):
    """TensorPipe's own choice of transports and channels (on one host its shm transport).
    Not in the default set: its reactor busy-polls, about 0.7 of a core in each of the two
    processes whether or not a step is running, which slows every other system measured in
    the same run. Measure it alone (``--systems in-process,torch-rpc-shm``)."""

    name = "torch-rpc-shm"

    def pipes(self) -> Pipes:
        return None, None
