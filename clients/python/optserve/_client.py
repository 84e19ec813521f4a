"""``optserve.Client`` and ``optserve.AsyncClient``: one method per endpoint.

Tensors in: ``torch.Tensor``, ``numpy.ndarray`` or nested lists of numbers. Tensors out:
``torch.Tensor`` on the CPU when torch is importable, else ``numpy.ndarray``. Tensor traffic is
safetensors (``binary=True``, the default) or JSON (``binary=False``); both carry the same bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import httpx

from . import _api, _base_client, _sparse
from ._api import Durability, NonFinitePolicy, ParamGroup, ParamsArg, StateFormat
from ._base_client import AsyncAPIClient, SyncAPIClient
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_MAX_RETRY_AFTER, DEFAULT_TIMEOUT
from ._exceptions import APIConnectionError, APIStatusError
from ._gc import gc_paused
from ._last_export import StateExport
from ._local import LocalChannel, LocalUnavailable
from ._tensors import TensorLike
from ._types import (
    EvaluationRequest,
    History,
    OptimizerInfo,
    ParamsResult,
    SchedulerInfo,
    SchedulerStepResult,
    SessionInfo,
    StepResult,
    VersionInfo,
)

__all__ = ["Client", "AsyncClient"]

AddParams = ParamsArg | Iterable[tuple[str, TensorLike]]


def _needs_count(params: AddParams) -> bool:
    """True when some tensor in ``params`` is unnamed (named by its position in the session)."""
    if isinstance(params, Mapping):
        return False
    if isinstance(params, Sequence):
        return any(not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str))
                   for p in params)
    return True


class Client(SyncAPIClient):
    """A synchronous optserve client.

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"``; default: env
            ``OPTSERVE_BASE_URL``, then ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; default: env ``OPTSERVE_API_KEY``.
        timeout: seconds (or an ``httpx.Timeout``) for each request.
        max_retries: how many retries after connection errors and 503 answers (never after
            another HTTP error status; see :mod:`optserve._base_client` for which requests are
            retried); None (the default): as many as ``retry_budget`` allows.
        retry_budget: seconds after a call's first failure during which it is retried (the
            last wait may end past it); default 60 when ``max_retries`` is None (a server
            restart on a loaded machine takes 5-15 s), else no bound in time.
        max_retry_after: the longest ``Retry-After`` (seconds, default 60) a 503 is waited for
            before its retry; a 503 asking for longer is raised at once.
        http_client: an ``httpx.Client`` to send with (e.g. with a custom transport); it is not
            closed by :meth:`close`.
        transport: how steps travel: ``"auto"`` (the default) uses the server's same-host
            shared-memory transport when the server runs on this machine (a loopback
            ``base_url`` whose ``GET /v1/transport`` names a socket this process can open,
            and whose port is the server's own: through a proxy, every step stays on it),
            else HTTP; ``"http"`` always HTTP; ``"local"`` requires the same-host transport.
            Each thread that steps through it gets a connection and shared segments of its
            own, so threads that share one client (workers of a synchronous round, say) never
            wait for each other's step nor see each other's values. A step tries it at most
            once, then goes over HTTP with the same idempotency key; what failed is
            remembered: no same-host server, no socket offered, or one that cannot be
            connected to: HTTP for every later step (asked again only when an open
            connection breaks: a restarted server names a new socket); a session the server
            will not bind on this connection (its limit): HTTP until a binding of it is let
            go (:meth:`delete_session`); a session whose slots this process cannot view (a
            bfloat16 parameter without torch): HTTP while the connection lasts; a binding
            gone stale (the session made again under its id): bound again and the step sent
            once more through it; a step the socket will not take (``not_supported_here``):
            that step over HTTP, the next tries again.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        *,
        http_client: httpx.Client | None = None,
        transport: str = "auto",
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        retry_budget: float | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, http_client, max_retry_after,
                         retry_budget)
        if transport not in ("auto", "http", "local"):
            raise ValueError(f"transport must be 'auto', 'http' or 'local', got {transport!r}")
        self.transport = transport
        #: per thread, its same-host channel (:meth:`_local_channel`), and all of them
        self._thread = threading.local()
        self._channels: list[tuple[threading.Thread, LocalChannel]] = []
        self._channels_lock = threading.Lock()
        #: the server's same-host socket once asked (None: none to use)
        self._local_path: str | None = None
        self._local_checked = transport == "http"
        #: the process the channels belong to (a forked child makes its own)
        self._pid = os.getpid()

    @property
    def _local(self) -> LocalChannel | None:
        """This thread's same-host channel, if it has one."""
        channel: LocalChannel | None = getattr(self._thread, "channel", None)
        return channel

    def _local_channel(self) -> LocalChannel | None:
        """This thread's same-host channel, set up on its first use; None when it cannot be
        used. A channel per thread: one connection carries one step at a time, and a step's
        segment holds its gradients and new values until the next step on it."""
        if self._pid != os.getpid():
            self._after_fork()
        channel = self._local
        if channel is not None:
            return channel
        path = self._local_socket()
        if path is None:
            return None
        channel = LocalChannel(path, self.api_key, self.timeout.read)
        try:
            channel.connect()
        except (LocalUnavailable, OSError) as exc:
            self._without_local(exc)
            return None
        with self._channels_lock:
            ended = [old for thread, old in self._channels if not thread.is_alive()]
            self._channels = [(t, old) for t, old in self._channels if t.is_alive()]
            self._channels.append((threading.current_thread(), channel))
        for old in ended:  # threads that have ended: their connections and segments go
            old.close_when_free()
        self._thread.channel = channel
        return channel

    def _after_fork(self) -> None:
        """In a child forked from the process that made them: let go of the parent's channels
        (this process's copies of their sockets and maps only; the parent keeps using them)
        and their locks, which a parent's thread may have held at the fork. Sharing one
        connection, parent and child read each other's answers."""
        inherited = [channel for _, channel in self._channels]
        self._pid, self._channels = os.getpid(), []
        self._channels_lock = threading.Lock()
        self._thread = threading.local()
        for channel in inherited:
            channel.close()

    def _local_socket(self) -> str | None:
        """The server's same-host socket, asked once; None when it cannot be used."""
        if self._local_checked:
            return self._local_path
        url = httpx.URL(self.base_url)
        path: str | None = None
        if url.host not in ("127.0.0.1", "localhost", "::1"):
            if self.transport == "local":
                raise LocalUnavailable(f"{self.base_url} is not on this machine")
        else:
            try:
                advertised = self._request(_api.transport()).get("local")
                if not advertised:
                    raise LocalUnavailable("the server offers no same-host transport")
                port = advertised.get("port")
                path = str(advertised["socket"])
            except (LocalUnavailable, OSError, KeyError, TypeError) as exc:
                self._without_local(exc)
            else:
                if self.transport == "auto" and isinstance(port, int) \
                        and url.port is not None and port != url.port:
                    path = None  # base_url is a proxy on this machine: keep every step on it
        self._local_path, self._local_checked = path, True
        return path

    def _without_local(self, exc: Exception) -> None:
        """The same-host transport cannot be used: an error when it was required, else HTTP
        from now on (as when the server was asked and named no socket)."""
        if self.transport == "local":
            raise LocalUnavailable(f"the same-host transport is not available: {exc}"
                                   ) from None
        self._local_path = None

    def _reconnect(self, channel: LocalChannel) -> bool:
        """Connect this thread's ``channel`` again after its connection broke: to its socket,
        else to the one the server names now (a restarted server listens on a new one). False
        when the same-host transport is gone (``"auto"``: this thread steps over HTTP from
        now on); :class:`LocalUnavailable` when it was required."""
        try:
            channel.connect()
            return True
        except LocalUnavailable:
            pass
        self._local_checked = False
        path = self._local_socket()
        if path is not None:
            channel.path = path
            try:
                channel.connect()
                return True
            except LocalUnavailable as exc:
                self._without_local(exc)
        with self._channels_lock:
            self._channels = [(t, old) for t, old in self._channels if old is not channel]
        self._thread.channel = None
        return False

    def close(self) -> None:
        """Close the client: its HTTP connections, and the same-host channels of every thread
        (each once the step another thread has in flight on it has ended, with its values;
        a later step finds the client closed)."""
        with self._channels_lock:
            channels, self._channels = self._channels, []
            self._local_path, self._local_checked = None, True
            self._thread = threading.local()
        for _, channel in channels:
            channel.close_when_free()
        super().close()

    def _step_local(self, id: str, grads: Mapping[str, TensorLike], *, return_params: bool,
                    worker: str | None, base_version: int | None,
                    param_groups: Mapping[int, Mapping[str, Any]] | None,
                    views: bool, scalars: Mapping[str, float] | None = None,
                    metrics: Literal["answer", "history"] = "answer", key: str,
                    sent: list[bool] | None = None) -> StepResult | None:
        """A step through shared memory, retried with its idempotency ``key`` after a broken
        connection; None when this step must go over HTTP instead (with the same key: a step
        the server applied before the connection broke is not applied again, and its answer
        comes back when the HTTP step asks what this one asked). ``sent`` gets a True before
        the first attempt (one that fails may or may not have reached the server: the HTTP
        step then asks what this one asked, which changes nothing when it had not)."""
        channel = self._local_channel()
        if channel is None:
            return None
        # a connection that broke on an earlier step's last try (closed then): anew, before
        # this step is sent (else it would fail on it at once, and with no retries left for
        # good)
        if not channel.connected and not self._reconnect(channel):
            return None
        changes = _api.group_changes(param_groups) or None
        attempt = -1
        first_failure: float | None = None
        while True:
            attempt += 1
            if sent is not None and not sent:
                sent.append(True)
            try:
                answer, params = channel.step(id, grads, return_params=return_params,
                                              base_version=base_version, worker=worker,
                                              param_groups=changes, key=key,
                                              scalars=_api.scalars_json(scalars)
                                              if scalars else None,
                                              history_only=_api.history_only(metrics))
            except LocalUnavailable:
                if self.transport == "local":
                    raise
                return None
            except OSError:
                channel.close()
                first_failure = _base_client._now() if first_failure is None else first_failure
                if not self._may_retry(attempt, first_failure):
                    raise
                try:
                    if not self._reconnect(channel):
                        return None  # over HTTP, with the same key: applied at most once
                except APIConnectionError:  # no server answers yet (restarting): again
                    if not self._may_retry(attempt + 1, first_failure):
                        raise
                continue
            except APIStatusError as exc:
                if exc.problem.get("code") == "not_supported_here" and self.transport == "auto":
                    return None  # this session steps over HTTP (nothing was applied)
                first_failure = _base_client._now() if first_failure is None else first_failure
                if exc.status_code != 503 or not self._may_retry(attempt, first_failure):
                    raise
                # nothing was applied: wait as the server asks, then the same key
                after = exc.problem.get("retry_after")
                delay = self._wait_503(attempt, float(after)
                                       if isinstance(after, (int, float)) else None,
                                       exc.problem.get("code"))
                if delay is None:  # longer than max_retry_after: the caller decides
                    raise
                time.sleep(delay)
                continue
            with gc_paused(len(params or ())):  # (copies of the new values: optserve._gc)
                return _api.step_result(answer, params, copy=not views)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ service
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: liveness (``{"status": "ok"}``)."""
        return self._request(_api.health())

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: readiness; raises :class:`InternalServerError` (503) when not
        ready."""
        return self._request(_api.ready())

    def list_optimizers(self) -> list[OptimizerInfo]:
        """``GET /v1/optimizers``: the supported optimizers and their default options."""
        return self._request(_api.list_optimizers())

    def list_schedulers(self) -> list[SchedulerInfo]:
        """``GET /v1/schedulers``: the supported schedulers and their default options."""
        return self._request(_api.list_schedulers())

    # ------------------------------------------------------------------ sessions
    def create_session(
        self,
        optimizer: str,
        params: ParamsArg | None = None,
        *,
        param_groups: Sequence[ParamGroup] | None = None,
        options: Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        id: str | None = None,
        nonfinite: NonFinitePolicy | None = None,
        binary: bool = True,
        sync: Mapping[str, Any] | None = None,
        max_staleness: int | None = None,
        staleness_lr: str | None = None,
        metrics: bool | None = None,
        history: int | None = None,
        shards: int | None = None,
        resources: Mapping[str, Any] | None = None,
        placement: str | None = None,
        durability: Durability | None = None,
    ) -> SessionInfo:
        """``POST /v1/sessions``: create a session.

        Args:
            optimizer: a ``torch.optim`` class name (``"SGD"``, ``"Adam"``, ...).
            params: one group's parameters: ``{name: tensor}`` or ``[tensor, ...]`` (named
                ``"0"``, ``"1"``, ... by position).
            param_groups: instead of ``params``: ``[{"params": {...} | [...], **options}]``;
                unnamed tensors are named by position across groups.
            options: the optimizer's options (``{"lr": 0.1, "momentum": 0.9}``).
            scheduler: ``{"name": "StepLR", "options": {...}, "step_on": "optimizer"}`` or a
                name.
            id: the session id (default: the server picks one); a taken id is a
                :class:`ConflictError`.
            nonfinite: the policy for non-finite gradients: ``"reject"``, ``"skip"``,
                ``"allow"``.
            binary: send the tensors as safetensors (default) or JSON.
            sync: synchronous rounds (parameter-server mode): ``{"workers": K, "reduce":
                "mean" | "sum", "timeout_s": T, "on_timeout": "fail" | "apply_partial"}``;
                each step waits until K distinct workers (``step(..., worker=...)``) pushed,
                then one step with the reduced gradients answers them all.
            max_staleness: refuse (409) an async push whose ``base_version`` is more than
                this many versions old.
            staleness_lr: ``"inverse"``: scale an async push's step lr by 1/(1+staleness).
            shards: split the parameters over this many session hosts (docs/cluster.md).
            resources: Ray engine: what the session's host needs (``{"num_gpus": 0.25}``).
            placement: Ray engine: ``"pack"`` or ``"spread"`` when choosing its host.
            durability: ``"step"`` (each step's log record fsynced before it is answered),
                ``"interval"`` (fsynced within ``OPTSERVE_FSYNC_INTERVAL_MS``) or
                ``"memory"`` (nothing on disk); default: the server's
                ``OPTSERVE_DURABILITY``.
            metrics: per-step norms in step answers and the history (default: the server's
                ``OPTSERVE_METRICS``).
        """
        return self._request(_api.create_session(
            optimizer, params, param_groups=param_groups, options=options,
            scheduler=scheduler, id=id, nonfinite=nonfinite, binary=binary,
            ps_options={"sync": sync, "max_staleness": max_staleness,
                        "staleness_lr": staleness_lr, "metrics": metrics,
                        "history": history, "shards": shards,
                        "resources": dict(resources) if resources is not None else None,
                        "placement": placement, "durability": durability},
        ))

    def list_sessions(self) -> list[SessionInfo]:
        """``GET /v1/sessions``."""
        return self._request(_api.list_sessions())

    def get_session(self, id: str, *, at_version: int | None = None) -> SessionInfo:
        """``GET /v1/sessions/{id}``: the session's description.

        ``at_version``: answered only at that version (sent as ``If-Match``), else
        :class:`~optserve.PreconditionFailedError` (412): read the state dict at the version
        of the parameters read before it."""
        return self._request(_api.get_session(id, at_version=at_version))

    def delete_session(self, id: str, *, base_version: int | None = None,
                       base_revision: int | None = None) -> None:
        """``DELETE /v1/sessions/{id}`` (and its shared segment, when it was bound).

        Conditional, as :meth:`import_state`: ``base_version`` (sent as ``If-Match``) and/or
        ``base_revision``; :class:`~optserve.PreconditionFailedError` (412), nothing deleted,
        when the session is no longer at them."""
        try:
            self._request(_api.delete_session(id, base_version=base_version,
                                              base_revision=base_revision))
        finally:
            self._release_local(id)

    def _release_local(self, id: str) -> None:
        """Let go of the session's shared segment on every thread's channel now (the server's
        and this process's mappings; bound again at its next step here)."""
        with self._channels_lock:
            channels = list(self._channels)
        for _, channel in channels:
            channel.release(id)

    def _release_local_later(self, id: str) -> None:
        """:meth:`_release_local` at each channel's next step: a garbage collector's finalizer
        (a ``RemoteOptimizer`` dropped unclosed) takes no lock and makes no exchange."""
        for _, channel in list(self._channels):
            channel.release_later(id)

    # ------------------------------------------------------------------ training
    def step(
        self,
        id: str,
        grads: Mapping[str, TensorLike] | None = None,
        *,
        return_params: bool | Literal["touched"] = True,
        binary: bool = True,
        worker: str | None = None,
        base_version: int | None = None,
        param_groups: Mapping[int, Mapping[str, Any]] | None = None,
        upcast: bool = False,
        params_dtype: str | None = None,
        scalars: Mapping[str, float] | None = None,
        into: Callable[[int], memoryview] | None = None,
        metrics: Literal["answer", "history"] = "answer",
        idempotency_key: str | None = None,
    ) -> StepResult:
        """``POST .../step``: apply ``grads`` (plus anything accumulated) and step.

        ``scalars`` (``{"loss": 0.31, "accuracy": 0.9}``, at most 16 finite numbers) are
        recorded with this step in the session's history (:meth:`history`); the answer's
        ``metrics`` holds the step's norms per group. ``metrics="history"``
        (``?metrics=history``): the answer carries no ``metrics`` (``StepResult.metrics`` is
        None) and the server takes the step's norms after answering, off the step's path;
        they are in the history before any later operation on the session.

        Narrower wires: with ``upcast=True`` float16/bfloat16 gradients are accepted for
        float32/float64 parameters (the server widens them once on its device and keeps its
        own precision); ``params_dtype="bfloat16"`` (or ``"float16"``) sends the parameters
        back narrowed.

        ``into``: where a large binary answer is read, ``into(size)`` giving a writable buffer
        of that size. With an :class:`optserve.ReceiveBuffer` every answer reuses one kept
        buffer (no fresh pages per step), and the parameters of the previous result, which
        view it, change: copy them out first (``RemoteOptimizer`` does).
        A gradient may be row-sparse (a ``torch.sparse_coo_tensor`` with one sparse dimension,
        as ``nn.Embedding(sparse=True)`` makes, or an :class:`optserve.RowSparse`): only its
        rows travel. ``return_params="touched"`` asks for only the rows stepped with sparse
        gradients (row-sparse tensors) and the parameters stepped with dense ones.

        ``param_groups`` changes group options with the step, atomically (``{0: {"lr": 1e-3,
        "betas": (0.9, 0.99)}}``): validated like :meth:`update_param_group`, a refused option
        fails the whole step and changes nothing (one round trip even when a local scheduler
        changes lr and betas every step).

        A parameter missing from ``grads`` (and from the accumulator) has grad ``None`` and is
        skipped, as torch skips it. With ``return_params=False`` only version, step and lr
        come back.

        Parameter-server mode: ``worker`` (header ``X-Optserve-Worker``) names this worker of
        a sync session; the call returns when its round has stepped (no client read timeout:
        the session's round timeout bounds the wait). ``base_version`` is the version the
        gradients were computed from (``?base_version=``), checked against the session's
        ``max_staleness`` (a :class:`ConflictError` with ``code == "stale_gradient"`` and
        ``problem["current_version"]``) and used for ``staleness_lr``.

        ``idempotency_key``: the step's ``Idempotency-Key`` (default: a fresh one), the same
        over either transport and for every retry: a step sent again with it is answered, not
        applied twice.
        """
        key = idempotency_key or uuid.uuid4().hex
        if self.transport != "http" and grads is not None and not upcast \
                and params_dtype is None and return_params != "touched" \
                and not _sparse.has_sparse(grads):
            local = self._step_local(id, grads, return_params=return_params, worker=worker,
                                     base_version=base_version, param_groups=param_groups,
                                     views=False, scalars=scalars, metrics=metrics, key=key)
            if local is not None:
                return local
        return self._step_http(id, grads, return_params=return_params, binary=binary,
                               worker=worker, base_version=base_version,
                               param_groups=param_groups, upcast=upcast,
                               params_dtype=params_dtype, scalars=scalars, into=into,
                               metrics=metrics, key=key)

    def _step_http(self, id: str, grads: Mapping[str, TensorLike] | None, *,
                   return_params: bool | Literal["touched"], binary: bool, worker: str | None,
                   base_version: int | None,
                   param_groups: Mapping[int, Mapping[str, Any]] | None, upcast: bool,
                   params_dtype: str | None, scalars: Mapping[str, float] | None,
                   into: Callable[[int], memoryview] | None,
                   metrics: Literal["answer", "history"], key: str) -> StepResult:
        """:meth:`step` over HTTP, without trying the same-host path: the way there for a
        step whose attempt at it already came back (``RemoteOptimizer`` tries it itself; a
        second try in the same step would only fail again)."""
        call = _api.step(id, grads, return_params=return_params, binary=binary, worker=worker,
                         base_version=base_version, param_groups=param_groups, upcast=upcast,
                         params_dtype=params_dtype, scalars=scalars, into=into, metrics=metrics)
        return self._request(_api.with_key(call, key))

    def push_grads(
        self, id: str, grads: Mapping[str, TensorLike], *, binary: bool = True,
        scalars: Mapping[str, float] | None = None, upcast: bool = False,
    ) -> VersionInfo:
        """``POST .../grads``: add ``grads`` into the session's accumulator; ``scalars`` are
        recorded with the next step (several values for one name: their mean); ``upcast``
        accepts float16/bfloat16 gradients for wider parameters (widened on the server)."""
        return self._request(_api.push_grads(id, grads, binary=binary, scalars=scalars,
                                             upcast=upcast))

    def history(
        self, id: str, *, since: int | None = None, until: int | None = None,
        fields: Iterable[str] | None = None, points: int | None = None,
    ) -> History:
        """``GET .../history``: the session's per-step metrics (rows ``since < n <= until``;
        ``fields`` such as ``["lr", "grad_norm", "scalars.loss"]``; ``points`` downsamples to
        that many buckets, each column as ``X.min``/``X.max``)."""
        out: History = self._request(_api.history(id, since=since, until=until, fields=fields,
                                                  points=points))
        return out

    def history_csv(
        self, id: str, *, since: int | None = None, until: int | None = None,
        fields: Iterable[str] | None = None, points: int | None = None,
    ) -> str:
        """The same as :meth:`history`, as CSV text (a header row, one line per row)."""
        out: str = self._request(_api.history(id, since=since, until=until, fields=fields,
                                              points=points, csv=True))
        return out

    def zero_grad(self, id: str) -> VersionInfo:
        """``POST .../zero_grad``: clear the accumulator."""
        return self._request(_api.zero_grad(id))

    def pull_rows(
        self, id: str, rows: Mapping[str, TensorLike], *, binary: bool = True,
        min_version: int | None = None, wait_s: float | None = None,
        params_dtype: str | None = None,
    ) -> ParamsResult:
        """Some rows of some parameters (``{"emb": [1, 5, 9]}``), in the order asked: the
        result's ``params`` are row-sparse tensors. Versions, long polls and ``params_dtype``
        as :meth:`get_params`."""
        return self._request(_api.pull_rows(id, rows, binary=binary, min_version=min_version,
                                            wait_s=wait_s, params_dtype=params_dtype))

    def open_evaluation_step(
        self, id: str, loss: float | None = None,
        grads: Mapping[str, TensorLike] | None = None, *, binary: bool = True,
        return_params: bool = True, timeout_s: float | None = None,
    ) -> StepResult | EvaluationRequest:
        """``POST .../step`` on an LBFGS session: open a step (with its first evaluation, the
        loss and gradients at the current parameters, when given). Answered with an
        :class:`EvaluationRequest` (post its answer with :meth:`evaluate`) or, when torch's
        ``LBFGS.step`` needs nothing more, the step's end."""
        return self._request(_api.open_evaluation_step(id, loss, grads, binary=binary,
                                                       return_params=return_params,
                                                       timeout_s=timeout_s))

    def evaluate(
        self, id: str, evaluation: str, loss: float,
        grads: Mapping[str, TensorLike] | None = None, *, binary: bool = True,
    ) -> StepResult | EvaluationRequest:
        """``POST .../step/{evaluation}``: the loss and gradients asked for; the step's next
        question, or its end (safe to retry)."""
        return self._request(_api.evaluate(id, evaluation, loss, grads, binary=binary))

    def abandon_step(self, id: str, step_id: str) -> str:
        """``DELETE .../step/{step_id}``: abandon an open LBFGS step (the session unchanged);
        how it ended: ``"abandoned"``, or ``"committed"`` if it had finished."""
        return str(self._request(_api.abandon_step(id, step_id))["outcome"])

    def get_params(
        self, id: str, names: Iterable[str] | None = None, *, binary: bool = True,
        min_version: int | None = None, wait_s: float | None = None,
        at_version: int | None = None, params_dtype: str | None = None,
    ) -> ParamsResult:
        """``GET .../params``: the parameters (all, or only ``names``). With ``min_version``
        and ``wait_s``: wait (at most ``wait_s``, which the server caps at 60 s) until the
        session reaches ``min_version``, then return the current state (check its
        ``version``: after a timeout it may still be older).

        ``at_version``: answered only at that version (sent as ``If-Match``), else
        :class:`~optserve.PreconditionFailedError` (412): the parameters of the version
        of a state dict or description read before.

        ``params_dtype="bfloat16"`` (or ``"float16"``): the floating parameters wider than it
        travel narrowed, as a step's answer with ``params_dtype`` (the session keeps its own;
        in float16 a value past its range, 65504, comes as an infinity)."""
        return self._request(_api.get_params(id, names, binary=binary,
                                             min_version=min_version, wait_s=wait_s,
                                             at_version=at_version, params_dtype=params_dtype))

    def configure_session(self, id: str, *, base_version: int | None = None,
                          base_revision: int | None = None, **options: Any) -> SessionInfo:
        """``PATCH /v1/sessions/{id}``: change parameter-server options between rounds:
        ``sync={"workers": K2}`` (merged into the current sync options; ``sync=None`` turns
        rounds off), ``max_staleness=S``, ``staleness_lr="inverse" | "none"``; ``metrics``,
        ``history``; ``scheduler=None`` removes the session's scheduler (after a
        ``ConflictError`` with ``code == "scheduler_out_of_range"``).

        ``base_version`` / ``base_revision``: conditional, as in :meth:`import_state`."""
        return self._request(_api.configure_session(id, options,
                                                    base_version=base_version,
                                                    base_revision=base_revision))

    def put_params(
        self, id: str, params: Mapping[str, TensorLike], *, binary: bool = True,
        base_version: int | None = None, base_revision: int | None = None,
    ) -> ParamsResult:
        """``PUT .../params``: overwrite some or all parameters.

        ``base_version`` / ``base_revision``: conditional, as in :meth:`import_state`."""
        return self._request(_api.put_params(id, params, binary=binary,
                                             base_version=base_version,
                                             base_revision=base_revision))

    def add_param_group(
        self, id: str, params: AddParams, *, binary: bool = True,
        base_version: int | None = None, base_revision: int | None = None, **options: Any
    ) -> SessionInfo:
        """``POST .../param_groups``: torch's ``add_param_group``.

        ``params`` is ``{name: tensor}``, ``[(name, tensor), ...]`` or ``[tensor, ...]``
        (unnamed tensors continue the positional names: the session's parameter count, ...).

        ``base_version`` / ``base_revision``: conditional, as in :meth:`import_state`.
        """
        start = len(self.get_session(id).param_names) if _needs_count(params) else 0
        return self._request(_api.add_param_group(id, params, options, start=start,
                                                  binary=binary,
                                                  base_version=base_version,
                                                  base_revision=base_revision))

    def update_param_group(self, id: str, index: int, *, base_version: int | None = None,
                           base_revision: int | None = None, **options: Any) -> SessionInfo:
        """``PATCH .../param_groups/{index}``: change a group's options (``lr=0.01``, ...).

        ``base_version`` / ``base_revision``: conditional, as in :meth:`import_state`."""
        return self._request(_api.update_param_group(id, index, options,
                                                     base_version=base_version,
                                                     base_revision=base_revision))

    def scheduler_step(self, id: str, metric: float | None = None, *,
                       base_version: int | None = None, base_revision: int | None = None
                       ) -> SchedulerStepResult:
        """``POST .../scheduler/step``: step the session's scheduler by hand (``metric`` for
        ReduceLROnPlateau).

        ``base_version`` / ``base_revision``: conditional, as in :meth:`import_state`."""
        return self._request(_api.scheduler_step(id, metric,
                                                 base_version=base_version,
                                                 base_revision=base_revision))

    # ------------------------------------------------------------------ state
    def export_state(self, id: str, format: StateFormat = "safetensors", *,
                     at_version: int | None = None) -> dict[str, Any]:
        """``GET .../state_dict``: torch's ``{"state": {int: {...}}, "param_groups": [...]}``
        (plus ``"scheduler"`` when the session has one), tensors as torch tensors (numpy
        without torch).

        ``format`` is only how it travels: ``"safetensors"`` (default), ``"json"``, or
        ``"torch"`` (a ``torch.save`` file, loaded here with ``weights_only=True``; needs
        torch). All three return the same dict.

        ``at_version``: answered only at that version (sent as ``If-Match``), else
        :class:`~optserve.PreconditionFailedError` (412): read the state dict at the version
        of the parameters read before it. The error says where the session is now:
        ``current_version`` (read the parameters and the state again at it),
        ``current_revision`` and ``current_state_tag``, the state tag a read now would carry
        (as the server's 412 gives it, ``X-Optserve-State-Tag``), in the form
        :attr:`StateExport.tag <optserve.StateExport.tag>` holds: a
        :class:`~optserve.StateExport` of :meth:`export_state_if_changed` whose ``tag``
        equals it is the session's state now, with no read.
        """
        return self._request(_api.export_state(id, format=format, at_version=at_version))

    def _export_state_at(self, id: str, format: StateFormat = "safetensors"
                         ) -> tuple[dict[str, Any], int | None]:
        """:meth:`export_state` and the session version the state is of."""
        return self._request(_api.export_state_at(id, format=format))

    def export_state_if_changed(self, id: str, last: StateExport | None = None, *,
                                format: StateFormat = "safetensors") -> StateExport:
        """``GET .../state_dict`` as :meth:`export_state`, read again only if the session
        changed since ``last`` (a :class:`~optserve.StateExport` this method answered for
        the same session and ``format``): sent with ``If-None-Match:`` the state tag ``last``
        was read with (``"r<revision>.<token>"``, its ``tag``), a 304 while nothing changed
        the session (no step, import, option change, ...; a session deleted and made again
        under the same id, or a server restarted since, is read whole), and then nothing is
        downloaded: the answer holds
        ``last``'s state dict again (its very tensors, ``not_modified=True``). Without
        ``last``, or when a tensor of it was changed in place since, the state is read whole
        (an edit through ``.data`` moves no version counter and is not seen: the 304 hands
        the edited tensor out again; copy a tensor before editing it so).
        The answer carries the session version and revision the state is of."""
        return self._request(_api.export_state_if_changed(id, format=format, last=last))

    def _export_state_if_changed(self, id: str, format: StateFormat,
                                 last: StateExport | None) -> StateExport:
        """:meth:`export_state_if_changed` with nothing of a whole read kept in the answer
        (``RemoteOptimizer`` keeps what it hands out: :meth:`StateExport.kept_as_given`)."""
        return self._request(_api.export_state_if_changed(id, format=format, last=last,
                                                          hold=False))

    def import_state(
        self,
        id: str,
        state_dict: Mapping[str, Any] | bytes,
        format: StateFormat = "safetensors",
        *,
        base_version: int | None = None,
        base_revision: int | None = None,
    ) -> SessionInfo:
        """``PUT .../state_dict``: load a torch-format state dict (e.g. a local optimizer's
        ``state_dict()``) into the session. With ``format="torch"``, ``state_dict`` may also be
        the bytes of a ``torch.save`` file.

        Conditional: ``base_version`` (sent as ``If-Match``) imports only if the session is
        still at that version (no step, import or overwrite since); ``base_revision`` only if
        nothing at all changed since (an option change, a scheduler step too: the session's
        ``revision``, as :meth:`get_session` gives it). Otherwise
        :class:`~optserve.PreconditionFailedError` (412), nothing imported."""
        return self._request(_api.import_state(id, state_dict, format=format,
                                               base_version=base_version,
                                               base_revision=base_revision))


class AsyncClient(AsyncAPIClient):
    """An asyncio optserve client: the same methods as :class:`Client`, as coroutines."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        *,
        http_client: httpx.AsyncClient | None = None,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        retry_budget: float | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, http_client, max_retry_after,
                         retry_budget)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return await self._request(_api.health())

    async def ready(self) -> dict[str, Any]:
        """``GET /readyz``."""
        return await self._request(_api.ready())

    async def list_optimizers(self) -> list[OptimizerInfo]:
        """``GET /v1/optimizers``."""
        return await self._request(_api.list_optimizers())

    async def list_schedulers(self) -> list[SchedulerInfo]:
        """``GET /v1/schedulers``."""
        return await self._request(_api.list_schedulers())

    async def create_session(
        self,
        optimizer: str,
        params: ParamsArg | None = None,
        *,
        param_groups: Sequence[ParamGroup] | None = None,
        options: Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        id: str | None = None,
        nonfinite: NonFinitePolicy | None = None,
        binary: bool = True,
        sync: Mapping[str, Any] | None = None,
        max_staleness: int | None = None,
        staleness_lr: str | None = None,
        metrics: bool | None = None,
        history: int | None = None,
        shards: int | None = None,
        resources: Mapping[str, Any] | None = None,
        placement: str | None = None,
        durability: Durability | None = None,
    ) -> SessionInfo:
        """``POST /v1/sessions``: see :meth:`Client.create_session`."""
        return await self._request(_api.create_session(
            optimizer, params, param_groups=param_groups, options=options,
            scheduler=scheduler, id=id, nonfinite=nonfinite, binary=binary,
            ps_options={"sync": sync, "max_staleness": max_staleness,
                        "staleness_lr": staleness_lr, "metrics": metrics,
                        "history": history, "shards": shards,
                        "resources": dict(resources) if resources is not None else None,
                        "placement": placement, "durability": durability},
        ))

    async def list_sessions(self) -> list[SessionInfo]:
        """``GET /v1/sessions``."""
        return await self._request(_api.list_sessions())

    async def get_session(self, id: str, *, at_version: int | None = None) -> SessionInfo:
        """``GET /v1/sessions/{id}``: see :meth:`Client.get_session`."""
        return await self._request(_api.get_session(id, at_version=at_version))

    async def delete_session(self, id: str, *, base_version: int | None = None,
                             base_revision: int | None = None) -> None:
        """``DELETE /v1/sessions/{id}``: see :meth:`Client.delete_session`."""
        await self._request(_api.delete_session(id,
                                                base_version=base_version,
                                                base_revision=base_revision))

    async def step(
        self,
        id: str,
        grads: Mapping[str, TensorLike] | None = None,
        *,
        return_params: bool | Literal["touched"] = True,
        binary: bool = True,
        worker: str | None = None,
        base_version: int | None = None,
        param_groups: Mapping[int, Mapping[str, Any]] | None = None,
        scalars: Mapping[str, float] | None = None,
        into: Callable[[int], memoryview] | None = None,
        metrics: Literal["answer", "history"] = "answer",
    ) -> StepResult:
        """``POST .../step``: see :meth:`Client.step`. Safe to await from many coroutines at
        once (e.g. one per worker of a sync round), each with its own ``into`` if any."""
        return await self._request(
            _api.step(id, grads, return_params=return_params, binary=binary, worker=worker,
                      base_version=base_version, param_groups=param_groups, scalars=scalars,
                      into=into, metrics=metrics)
        )

    async def push_grads(
        self, id: str, grads: Mapping[str, TensorLike], *, binary: bool = True,
        scalars: Mapping[str, float] | None = None, upcast: bool = False,
    ) -> VersionInfo:
        """``POST .../grads`` (see :meth:`Client.push_grads`)."""
        return await self._request(_api.push_grads(id, grads, binary=binary, scalars=scalars,
                                                   upcast=upcast))

    async def history(
        self, id: str, *, since: int | None = None, until: int | None = None,
        fields: Iterable[str] | None = None, points: int | None = None,
    ) -> History:
        """``GET .../history``: see :meth:`Client.history`."""
        out: History = await self._request(_api.history(id, since=since, until=until,
                                                        fields=fields, points=points))
        return out

    async def history_csv(
        self, id: str, *, since: int | None = None, until: int | None = None,
        fields: Iterable[str] | None = None, points: int | None = None,
    ) -> str:
        """``GET .../history`` as CSV text."""
        out: str = await self._request(_api.history(id, since=since, until=until,
                                                    fields=fields, points=points, csv=True))
        return out

    async def zero_grad(self, id: str) -> VersionInfo:
        """``POST .../zero_grad``."""
        return await self._request(_api.zero_grad(id))

    async def pull_rows(
        self, id: str, rows: Mapping[str, TensorLike], *, binary: bool = True,
        min_version: int | None = None, wait_s: float | None = None,
        params_dtype: str | None = None,
    ) -> ParamsResult:
        """See :meth:`Client.pull_rows`."""
        return await self._request(_api.pull_rows(id, rows, binary=binary,
                                                  min_version=min_version, wait_s=wait_s,
                                                  params_dtype=params_dtype))

    async def open_evaluation_step(
        self, id: str, loss: float | None = None,
        grads: Mapping[str, TensorLike] | None = None, *, binary: bool = True,
        return_params: bool = True, timeout_s: float | None = None,
    ) -> StepResult | EvaluationRequest:
        """See :meth:`Client.open_evaluation_step`."""
        return await self._request(_api.open_evaluation_step(
            id, loss, grads, binary=binary, return_params=return_params, timeout_s=timeout_s))

    async def evaluate(
        self, id: str, evaluation: str, loss: float,
        grads: Mapping[str, TensorLike] | None = None, *, binary: bool = True,
    ) -> StepResult | EvaluationRequest:
        """See :meth:`Client.evaluate`."""
        return await self._request(_api.evaluate(id, evaluation, loss, grads, binary=binary))

    async def abandon_step(self, id: str, step_id: str) -> str:
        """See :meth:`Client.abandon_step`."""
        return str((await self._request(_api.abandon_step(id, step_id)))["outcome"])

    async def get_params(
        self, id: str, names: Iterable[str] | None = None, *, binary: bool = True,
        min_version: int | None = None, wait_s: float | None = None,
        at_version: int | None = None, params_dtype: str | None = None,
    ) -> ParamsResult:
        """``GET .../params``: see :meth:`Client.get_params`."""
        return await self._request(_api.get_params(id, names, binary=binary,
                                                   min_version=min_version, wait_s=wait_s,
                                                   at_version=at_version,
                                                   params_dtype=params_dtype))

    async def configure_session(self, id: str, *, base_version: int | None = None,
                                base_revision: int | None = None, **options: Any
                                ) -> SessionInfo:
        """``PATCH /v1/sessions/{id}``: see :meth:`Client.configure_session`."""
        return await self._request(_api.configure_session(id, options,
                                                          base_version=base_version,
                                                          base_revision=base_revision))

    async def put_params(
        self, id: str, params: Mapping[str, TensorLike], *, binary: bool = True,
        base_version: int | None = None, base_revision: int | None = None,
    ) -> ParamsResult:
        """``PUT .../params``: see :meth:`Client.put_params`."""
        return await self._request(_api.put_params(id, params, binary=binary,
                                                   base_version=base_version,
                                                   base_revision=base_revision))

    async def add_param_group(
        self, id: str, params: AddParams, *, binary: bool = True,
        base_version: int | None = None, base_revision: int | None = None, **options: Any
    ) -> SessionInfo:
        """``POST .../param_groups``: see :meth:`Client.add_param_group`."""
        start = len((await self.get_session(id)).param_names) if _needs_count(params) else 0
        return await self._request(_api.add_param_group(id, params, options, start=start,
                                                        binary=binary,
                                                        base_version=base_version,
                                                        base_revision=base_revision))

    async def update_param_group(self, id: str, index: int, *, base_version: int | None = None,
                                 base_revision: int | None = None, **options: Any
                                 ) -> SessionInfo:
        """``PATCH .../param_groups/{index}``: see :meth:`Client.update_param_group`."""
        return await self._request(_api.update_param_group(id, index, options,
                                                           base_version=base_version,
                                                           base_revision=base_revision))

    async def scheduler_step(self, id: str, metric: float | None = None, *,
                             base_version: int | None = None, base_revision: int | None = None
                             ) -> SchedulerStepResult:
        """``POST .../scheduler/step``: see :meth:`Client.scheduler_step`."""
        return await self._request(_api.scheduler_step(id, metric,
                                                       base_version=base_version,
                                                       base_revision=base_revision))

    async def export_state(self, id: str, format: StateFormat = "safetensors", *,
                           at_version: int | None = None) -> dict[str, Any]:
        """``GET .../state_dict``: see :meth:`Client.export_state`."""
        return await self._request(_api.export_state(id, format=format, at_version=at_version))

    async def export_state_if_changed(self, id: str, last: StateExport | None = None, *,
                                      format: StateFormat = "safetensors") -> StateExport:
        """``GET .../state_dict``, read again only if the session changed since ``last``:
        see :meth:`Client.export_state_if_changed`."""
        return await self._request(_api.export_state_if_changed(id, format=format, last=last))

    async def import_state(
        self,
        id: str,
        state_dict: Mapping[str, Any] | bytes,
        format: StateFormat = "safetensors",
        *,
        base_version: int | None = None,
        base_revision: int | None = None,
    ) -> SessionInfo:
        """``PUT .../state_dict``: see :meth:`Client.import_state`."""
        return await self._request(_api.import_state(id, state_dict, format=format,
                                                     base_version=base_version,
                                                     base_revision=base_revision))
