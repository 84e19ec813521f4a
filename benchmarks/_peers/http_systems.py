"""Systems reached over HTTP with a plain ``httpx.Client``: the raw echo (the TCP floor) and
optserve started as ``scripts/serve`` starts it (``python -m app``), stepped with safetensors
or JSON bodies."""

from __future__ import annotations

import base64
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks._peers import transfer
from benchmarks._peers.base import GradSystem, RunConfig, System, register
from benchmarks._peers.cases import Case
from benchmarks._server import PIDS, PROCS, free_port, server, user_defaults
from benchmarks.echo_app import ECHO_PATH

BINARY = "application/octet-stream"
#: a loaded 2-core machine can take a minute or more to import torch and start a server
START_TIMEOUT_S = 300.0


class HttpSystem(System):
    """Owns one server process (started in ``start``) and one ``httpx.Client`` to it."""

    def start(self) -> dict[str, Any]:
        self._stack = ExitStack()
        url = self._stack.enter_context(self.serve())
        self.url = url
        self.http = self._stack.enter_context(httpx.Client(base_url=url, timeout=600))
        return {"server_pid": PIDS[url], "server_log": str(self.log_path()),
                **self.server_facts()}

    def log_path(self) -> Path:
        folder = Path(self.config.data_dir) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.name}-{self.durability or 'server'}.log"

    def post(self, path: str, content: list[bytes | memoryview],
             headers: dict[str, str]) -> tuple[int, bytearray]:
        """POST the way ``transfer.post`` does (the body in pieces, the answer into one
        buffer); when the server is gone, say how it ended and what it logged."""
        try:
            return transfer.post(self.http, path, content, headers)
        except httpx.TransportError as exc:
            raise self.gone(exc) from exc

    def gone(self, exc: Exception) -> RuntimeError:
        proc = PROCS.get(self.url)
        code = proc.poll() if proc else None
        tail = self.log_path().read_text(errors="replace")[-3000:]
        return RuntimeError(f"{exc!r}; server exit status {code}; its log ends:\n{tail}")

    def serve(self) -> Any:
        raise NotImplementedError

    def server_facts(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self._stack.close()


@register
class Echo(HttpSystem, GradSystem):
    """The same safetensors bytes optserve-binary sends, posted and read back unchanged from a
    minimal ASGI app (``benchmarks/echo_app.py``) under uvicorn, moved as optserve-binary
    moves them (``transfer.post``): no encoding, no decoding, no optimizer. Checked by
    comparing the bytes that came back."""

    name = "echo"
    check = "self"

    def serve(self) -> Any:
        return server(app="benchmarks.echo_app:app", start_timeout_s=START_TIMEOUT_S,
                      log=self.log_path())

    def server_facts(self) -> dict[str, Any]:
        return {"command": "uvicorn benchmarks.echo_app:app --loop uvloop --http httptools"}

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        self.bodies = [b"".join(transfer.safetensors_buffers({"w": g})) for g in self.grads]
        self.last_sent, self.last = b"", bytearray()

    def exchange(self, grad_index: int) -> None:
        body = self.bodies[grad_index]
        status, self.last = self.post(ECHO_PATH, [body], {"Content-Type": BINARY})
        if status != 200:
            raise RuntimeError(f"echo answered {status}")
        self.last_sent = body

    def self_check(self) -> str | None:
        if not self.last_sent:
            return "no step was taken"
        return None if self.last == self.last_sent else "echoed bytes differ from those sent"


class Optserve(HttpSystem, GradSystem):
    """optserve as a user starts it: ``python -m app`` with ``OPTSERVE_TORCH_THREADS=1``, a
    fresh ``OPTSERVE_DATA_DIR`` and ``OPTSERVE_DURABILITY`` set to the run's level, every
    other setting at the server's default (the access log at ``info`` included: no other
    ``OPTSERVE_*`` reaches it); one session per case, created over JSON (the parameters as
    base64)."""

    per_durability = True
    #: the step request's content type
    content_type: ClassVar[str] = BINARY

    def serve(self) -> Any:
        port = free_port()
        data_dir = Path(self.config.data_dir) / f"{self.name}-{self.durability}"
        self.env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1",
                    "OPTSERVE_DATA_DIR": str(data_dir),
                    "OPTSERVE_DURABILITY": str(self.durability),
                    **dict(self.config.server_env)}
        # the server's own defaults for everything else: the printed command is the whole
        # configuration
        return server(self.env, command=[sys.executable, "-m", "app"], port=port,
                      start_timeout_s=START_TIMEOUT_S, log=self.log_path(),
                      unset=user_defaults(self.env))

    def server_facts(self) -> dict[str, Any]:
        env = " ".join(f"{k}={v}" for k, v in self.env.items() if k != "OPTSERVE_DATA_DIR")
        return {"command": f"{env} .venv/bin/python -m app", "data_dir": self.env[
            "OPTSERVE_DATA_DIR"]}

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        self.sid = f"peers-{case.optimizer}-{case.n}"
        body = {"id": self.sid, "optimizer": case.spec.name, "options": case.spec.options,
                "params": {"w": {"dtype": "float32", "shape": [case.n],
                                 "b64": base64.b64encode(initial.numpy().tobytes()).decode()}}}
        status, answer = self.post("/v1/sessions", [orjson.dumps(body)],
                                   {"Content-Type": "application/json"})
        if status != 201:
            raise RuntimeError(f"create session: {status} {bytes(answer[:500])!r}")
        self.path = f"/v1/sessions/{self.sid}/step"
        self.last: npt.NDArray[np.float32] | None = None

    def encode(self, grad: torch.Tensor) -> list[bytes | memoryview]:
        """The step request body for one gradient, as buffers sent one after the other
        (timed: the worker pays it)."""
        raise NotImplementedError

    def decode(self, body: bytearray) -> npt.NDArray[np.float32]:
        """The updated parameters from the step response (timed)."""
        raise NotImplementedError

    def exchange(self, grad_index: int) -> None:
        status, body = self.post(self.path, self.encode(self.grads[grad_index]),
                                 {"Content-Type": self.content_type, "Accept": self.content_type})
        if status != 200:
            raise RuntimeError(f"step: {status} {bytes(body[:500])!r}")
        self.last = self.decode(body)

    def params(self) -> npt.NDArray[np.float32]:
        if self.last is None:
            raise RuntimeError("no step was taken")
        return self.last

    def teardown(self) -> None:
        self.http.delete(f"/v1/sessions/{self.sid}")


@register
class OptserveBinary(Optserve):
    """Safetensors both ways, without copies in the worker: the body is the framed header and
    a view of the gradient's memory (``transfer.safetensors_buffers``), the new parameters a
    view of the answer's buffer (``transfer.read_safetensors``)."""

    name = "optserve-binary"

    def encode(self, grad: torch.Tensor) -> list[bytes | memoryview]:
        return transfer.safetensors_buffers({"w": grad})

    def decode(self, body: bytearray) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = transfer.read_safetensors(body)["w"].numpy()
        return out


@register
class OptserveBinaryHistory(OptserveBinary):
    """``optserve-binary`` asking ``?metrics=history``: the answer carries no ``metrics``, and
    the server takes the step's norms after answering (into the session's history, the same
    values). What the norms on the step's path cost a float32 step (``optserve-bf16-history``
    is the same for a bfloat16 one)."""

    name = "optserve-binary-history"

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        super().prepare(case, initial)
        self.path += "?metrics=history"


@register
class OptserveBinarySafetensors(Optserve):
    """optserve-binary as a user of ``safetensors.torch`` and httpx's defaults writes it:
    ``save`` builds the body (a copy of the gradient), ``httpx.Client.post(content=...)``
    sends it (httpcore copies what is left of it after every partial send) and
    ``load(response.content)`` reads the answer (httpx joins it into one ``bytes``, ``load``
    copies it): at least three more 4N-byte buffers per step than optserve-binary, each a
    fresh one whose pages fault in."""

    name = "optserve-binary-st"

    def exchange(self, grad_index: int) -> None:
        try:
            r = self.http.post(self.path, content=st_save({"w": self.grads[grad_index]}),
                               headers={"Content-Type": BINARY, "Accept": BINARY})
        except httpx.TransportError as exc:
            raise self.gone(exc) from exc
        if r.status_code != 200:
            raise RuntimeError(f"step: {r.status_code} {r.text[:500]}")
        self.last = st_load(r.content)["w"].numpy()


@register
class OptserveJson(Optserve):
    """JSON tensors both ways (``{"dtype", "shape", "data": [...]}``, orjson with numpy)."""

    name = "optserve-json"
    content_type = "application/json"

    @classmethod
    def supports(cls, case: Case, config: RunConfig) -> bool:
        return case.n <= config.json_max_n

    def encode(self, grad: torch.Tensor) -> list[bytes | memoryview]:
        return [orjson.dumps({"grads": {"w": {"dtype": "float32", "shape": [grad.numel()],
                                              "data": grad.numpy()}}},
                             option=orjson.OPT_SERIALIZE_NUMPY)]

    def decode(self, body: bytearray) -> npt.NDArray[np.float32]:
        return np.asarray(orjson.loads(body)["params"]["w"]["data"], dtype=np.float32)


@register
class OptserveShm(Optserve):
    """The same-host transport as a user of the SDK's drop-in optimizer gets it:
    ``optserve.RemoteOptimizer`` over a local parameter tensor (the session created by it),
    its ``optserve.Client`` choosing the transport automatically for a loopback server. A
    step writes ``p.grad`` into the session's shared segment, sends a small message over a
    Unix socket, and finds the new values in ``p``, which lives in its slot of the segment
    (``zero_copy``, the default; ``optserve-shm-copy`` copies them in instead). No HTTP on the
    step path."""

    name = "optserve-shm"
    #: the session's per-step metrics (None: the server's default, on)
    metrics: ClassVar[bool | None] = None
    #: the SDK client's transport
    transport: ClassVar[str] = "local"
    #: ``RemoteOptimizer``'s ``wire_dtype`` (None: gradients and answers in float32)
    wire_dtype: ClassVar[str | None] = None
    #: ``RemoteOptimizer``'s ``zero_copy`` (the parameter lives in its slot of the segment)
    zero_copy: ClassVar[bool] = True
    #: ``RemoteOptimizer``'s ``detect_data_edits`` (each step compares the parameters with a
    #: reference and keeps a copy of the new values as the next one: ``optserve._edits``)
    detect_data_edits: ClassVar[bool] = True

    def start(self) -> dict[str, Any]:
        facts = super().start()
        import optserve

        self.client = self._stack.enter_context(optserve.Client(
            self.url, transport=self.transport))
        return facts

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        import optserve

        self.sid = f"peers-{case.optimizer}-{case.n}"
        self.w = initial.clone()
        self.opt = optserve.RemoteOptimizer([("w", self.w)], case.spec.name, self.client,
                                            session_id=self.sid, metrics=self.metrics,
                                            wire_dtype=self.wire_dtype,
                                            zero_copy=self.zero_copy,
                                            detect_data_edits=self.detect_data_edits,
                                            **case.spec.options)
        self.last = None

    def exchange(self, grad_index: int) -> None:
        self.w.grad = self.grads[grad_index]
        self.opt.step()
        self.last = self.w.numpy()

    def info(self) -> dict[str, Any]:
        """Whether the optimizer checked for edits through ``p.data`` (kept references of the
        parameters' values: ``optserve._edits``)."""
        return {"detect_data_edits": self.opt._refs is not None}


@register
class OptserveShmNoMetrics(OptserveShm):
    """``optserve-shm`` with the session's per-step metrics off (``RemoteOptimizer(...,
    metrics=False)``): what the norms cost the same-host path."""

    name = "optserve-shm-nometrics"
    metrics = False


@register
class OptserveShmNoEdits(OptserveShm):
    """``optserve-shm`` with ``RemoteOptimizer(..., detect_data_edits=False)``: what the SDK's
    check for edits through ``p.data`` costs the same-host path (the comparison with the
    reference before each step, and the copy of the new values into it after: a parameter
    living in its slot cannot be its own reference)."""

    name = "optserve-shm-noedits"
    detect_data_edits = False


@register
class OptserveShmBare(OptserveShm):
    """``optserve-shm`` with neither the session's per-step metrics nor the SDK's edit check
    (``metrics=False, detect_data_edits=False``): the optimizer, the copies the transport needs
    (gradients into the segment, new values into the parameter slots) and the round trip."""

    name = "optserve-shm-bare"
    metrics = False
    detect_data_edits = False


@register
class OptserveShmCopy(OptserveShm):
    """``optserve-shm`` with ``RemoteOptimizer(..., zero_copy=False)``: the parameter keeps its
    own memory and each step's new values are copied into it from the segment (what
    ``zero_copy`` saves)."""

    name = "optserve-shm-copy"
    zero_copy = False


@register
class OptserveSdkHttp(OptserveShm):
    """``optserve-shm`` over TCP: ``RemoteOptimizer`` with ``optserve.Client(url,
    transport="http")``, safetensors both ways (the SDK's own framing: the body sent in pieces
    from the gradient's memory, the answer read into one buffer and copied into ``p``)."""

    name = "optserve-sdk-http"
    transport = "http"


@register
class OptserveSdkBf16(OptserveSdkHttp):
    """``optserve-sdk-http`` with ``RemoteOptimizer(..., wire_dtype="bfloat16")``: gradients
    narrowed and widened on the server, answers narrowed and widened into ``p``; the session
    keeps float32 master weights. The replay rounds the gradients the same way; the bitwise
    check reads the server's float32 parameters."""

    name = "optserve-sdk-bf16"
    grad_transform = "bf16"
    wire_dtype = "bfloat16"

    def params(self) -> npt.NDArray[np.float32]:
        got = self.client.get_params(self.sid).params["w"]
        out: npt.NDArray[np.float32] = np.asarray(got, dtype=np.float32)
        return out


@register
class OptserveBf16(OptserveBinary):
    """bfloat16 gradients and parameters on the wire (half the bytes each way: ``?upcast=true``
    widens the gradients on the server, ``?params_dtype=bfloat16`` narrows the answer); the
    session keeps float32 master weights and state. The replay rounds the gradients the same
    way; the bitwise check reads the float32 parameters after the timed steps."""

    name = "optserve-bf16"
    grad_transform = "bf16"
    #: the step's query
    query: ClassVar[str] = "upcast=true&params_dtype=bfloat16"

    def prepare(self, case: Case, initial: torch.Tensor) -> None:
        super().prepare(case, initial)
        self.path += f"?{self.query}"
        # the worker's float32 copy of the parameters, widened into in place at every step (as
        # RemoteOptimizer copies an answer into the model's parameter): a fresh 4N-byte
        # tensor per step would add its page faults (glibc maps a block above 32 MB afresh)
        self.values = torch.empty(case.n)
        # and the narrowed gradient, narrowed into in place (sent before the next step
        # narrows): a fresh 2N-byte tensor per step came with 380-1,270 page faults a step
        # at Adam 1e7 in some runs (glibc trimming its heap's top and faulting it in again)
        self.narrow = torch.empty(case.n, dtype=torch.bfloat16)

    def encode(self, grad: torch.Tensor) -> list[bytes | memoryview]:
        return transfer.safetensors_buffers({"w": self.narrow.copy_(grad)})

    def decode(self, body: bytearray) -> npt.NDArray[np.float32]:
        self.values.copy_(transfer.read_safetensors(body)["w"])
        out: npt.NDArray[np.float32] = self.values.numpy()
        return out

    def params(self) -> npt.NDArray[np.float32]:
        r = self.http.get(f"/v1/sessions/{self.sid}/params", headers={"Accept": BINARY})
        out: npt.NDArray[np.float32] = st_load(r.content)["w"].numpy()
        return out


@register
class OptserveBf16History(OptserveBf16):
    """``optserve-bf16`` asking ``?metrics=history``: the answer carries no ``metrics``, and the
    server takes the step's norms after answering (into the session's history, the same
    values), while the half-size answer goes out and the client widens it, narrows the next
    gradient and sends it. What the norms on the step's path cost a bfloat16 step."""

    name = "optserve-bf16-history"
    query = "upcast=true&params_dtype=bfloat16&metrics=history"
