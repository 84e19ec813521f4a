"""``RemoteEmbedding``: an embedding table that lives in an optserve session, for tables too big
for the worker. Its ``forward`` pulls only the rows of the ids it is given; backward leaves
their gradient; :meth:`RemoteEmbedding.step` pushes it as a row-sparse gradient and the server
steps the table (SparseAdam, sparse SGD, Adagrad).

::

    table = optserve.RemoteEmbedding.create(client, 10_000_000, 64, "SparseAdam", lr=1e-3)
    head = torch.nn.Linear(64, 1)
    head_opt = torch.optim.Adam(head.parameters())
    for ids, y in batches:
        loss = F.mse_loss(head(table(ids).mean(1)).squeeze(1), y)
        loss.backward()
        table.step()          # one request: the touched rows' gradient; the server steps
        head_opt.step()
        head_opt.zero_grad()

The gradient it sends is the one ``nn.Embedding(sparse=True)`` would leave for the whole table
(row indices in the order of the ids, one row per id, duplicates kept), so one forward per
step trains bitwise as a local ``nn.Embedding(sparse=True)`` with the same optimizer. Several
forwards before a step send their gradients together (their sum; torch sums a local table's
the same way, though not necessarily in the same order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from ._client import Client
from ._types import StepResult

__all__ = ["RemoteEmbedding"]


class RemoteEmbedding(torch.nn.Module):
    """An embedding table in an optserve session (parameter ``name`` of session
    ``session_id``): ``forward(ids)`` pulls the unique rows of ``ids`` (one request) and looks
    them up; :meth:`step` sends the gradient of the rows used since the last step."""

    def __init__(self, client: Client, session_id: str, name: str = "weight", *,
                 binary: bool = True) -> None:
        super().__init__()
        info = client.get_session(session_id)
        if name not in info.params:
            raise ValueError(f"session {session_id!r} has no parameter {name!r}; it has "
                             f"{sorted(info.params)}")
        shape = info.params[name].shape
        if len(shape) != 2:
            raise ValueError(f"{name!r} has shape {list(shape)}; an embedding table has two "
                             "dimensions (rows, embedding_dim)")
        self.client = client
        self.session_id = session_id
        self.name = name
        self.num_embeddings, self.embedding_dim = int(shape[0]), int(shape[1])
        self.binary = binary
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: the session version the rows of the last forward came from
        self.version = info.version

    @classmethod
    def create(cls, client: Client, num_embeddings: int, embedding_dim: int,
               optimizer: str = "SparseAdam", *, weight: torch.Tensor | None = None,
               session_id: str | None = None, name: str = "weight", binary: bool = True,
               **options: Any) -> RemoteEmbedding:
        """A new session holding the table (``weight``, else N(0, 1) values as
        ``nn.Embedding`` starts from) with an optimizer that steps sparse gradients."""
        if weight is None:
            weight = torch.randn(num_embeddings, embedding_dim)
        if tuple(weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"weight has shape {list(weight.shape)}, not "
                             f"[{num_embeddings}, {embedding_dim}]")
        info = client.create_session(optimizer, {name: weight.detach()}, options=options,
                                     id=session_id, binary=binary)
        return cls(client, info.id, name, binary=binary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        result = self.client.pull_rows(self.session_id, {self.name: unique.to(torch.int64)},
                                       binary=self.binary)
        self.version = result.version
        rows = result.params[self.name]._values()
        leaf = rows.detach().to(ids.device).clone().requires_grad_(torch.is_grad_enabled())
        # sparse=True: the gradient of these rows is the ids' rows in order, as a table's is
        out = F.embedding(inverse.reshape(ids.shape), leaf, sparse=True)
        if leaf.requires_grad:
            self._pending.append((unique, leaf))
        return out

    def sparse_grad(self) -> torch.Tensor | None:
        """The table's gradient from the forwards since the last step (``None`` without any):
        what ``nn.Embedding(sparse=True).weight.grad`` would hold."""
        indices, values = [], []
        for unique, leaf in self._pending:
            g = leaf.grad
            if g is None:
                continue
            indices.append(unique[g._indices()[0]])
            values.append(g._values())
        if not indices:
            return None
        return torch.sparse_coo_tensor(torch.cat(indices).reshape(1, -1), torch.cat(values),
                                       (self.num_embeddings, self.embedding_dim),
                                       check_invariants=False)

    def step(self) -> StepResult:
        """Send the gradient of the rows used since the last step; the server steps the table
        (a step without rows still steps, as an optimizer step without gradients does)."""
        grad = self.sparse_grad()
        result = self.client.step(self.session_id, {self.name: grad} if grad is not None
                                  else {}, return_params=False, binary=self.binary)
        self.zero_grad()
        self.version = result.version
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the rows used since the last step (their gradients with them)."""
        self._pending.clear()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, session={self.session_id!r}, "
                f"name={self.name!r}")
