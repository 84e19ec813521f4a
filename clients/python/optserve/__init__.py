"""optserve: PyTorch's ``torch.optim`` as an HTTP service. The Python SDK.

- :class:`Client` / :class:`AsyncClient`: one method per endpoint.
- :class:`RemoteOptimizer`: a ``torch.optim.Optimizer`` backed by a server session (needs
  torch); with ``worker=...`` one of many workers of a parameter-server session.
- :func:`pull_params`: copy a session's current parameters into a module (needs torch).
- :class:`RemoteEmbedding`: an embedding table kept in a session, its rows pulled on demand and
  stepped with row-sparse gradients (needs torch).
- Errors: :class:`OptserveError` and its subclasses (see :mod:`optserve._exceptions`).
- :class:`PrecisionWarning`: an option given as a NumPy float32/float16 scalar, with which a
  local torch optimizer would compute in that precision (see :mod:`optserve._precision`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base_client import ReceiveBuffer
from ._client import AsyncClient, Client
from ._constants import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GradientLayoutError,
    InternalServerError,
    NotFoundError,
    OptserveError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    RateLimitError,
    UnknownOptionError,
    ValidationError,
)
from ._last_export import StateExport
from ._local import LocalUnavailable
from ._precision import PrecisionWarning
from ._sparse import RowSparse
from ._tensors import Tensor, TensorLike
from ._types import (
    EvaluationRequest,
    History,
    OptimizerInfo,
    ParamGroupInfo,
    ParamInfo,
    ParamsResult,
    SchedulerInfo,
    SchedulerStepResult,
    SessionInfo,
    StepResult,
    VersionInfo,
)
from ._version import __version__

if TYPE_CHECKING:
    from ._embedding import RemoteEmbedding
    from ._optimizer import RemoteOptimizer
    from ._pull import pull_params

__all__ = [
    "__version__",
    "Client",
    "AsyncClient",
    "RemoteOptimizer",
    "ReceiveBuffer",
    "RemoteEmbedding",
    "pull_params",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "Tensor",
    "TensorLike",
    "SessionInfo",
    "ParamGroupInfo",
    "ParamInfo",
    "StepResult",
    "EvaluationRequest",
    "History",
    "RowSparse",
    "ParamsResult",
    "VersionInfo",
    "SchedulerStepResult",
    "StateExport",
    "OptimizerInfo",
    "SchedulerInfo",
    "OptserveError",
    "LocalUnavailable",
    "PrecisionWarning",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "PreconditionFailedError",
    "PayloadTooLargeError",
    "ValidationError",
    "UnknownOptionError",
    "GradientLayoutError",
    "RateLimitError",
    "InternalServerError",
]


def __getattr__(name: str) -> Any:
    from ._constants import TORCH_HINT

    # RemoteOptimizer subclasses torch.optim.Optimizer: import torch only when it is asked for.
    if name == "RemoteOptimizer":
        try:
            from ._optimizer import RemoteOptimizer
        except ImportError as exc:  # pragma: no cover - needs an environment without torch
            raise ImportError(
                f"optserve.RemoteOptimizer needs torch: {TORCH_HINT}"
            ) from exc
        return RemoteOptimizer
    if name == "RemoteEmbedding":
        try:
            from ._embedding import RemoteEmbedding
        except ImportError as exc:  # pragma: no cover - needs an environment without torch
            raise ImportError(
                f"optserve.RemoteEmbedding needs torch: {TORCH_HINT}"
            ) from exc
        return RemoteEmbedding
    if name == "pull_params":
        try:
            from ._pull import pull_params
        except ImportError as exc:  # pragma: no cover - needs an environment without torch
            raise ImportError(
                f"optserve.pull_params needs torch: {TORCH_HINT}"
            ) from exc
        return pull_params
    raise AttributeError(f"module 'optserve' has no attribute {name!r}")
