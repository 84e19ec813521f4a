"""The SDK against a real server for embedding tables and LBFGS: ``RemoteOptimizer`` with
``nn.Embedding(sparse=True)`` (row-sparse pushes, touched rows back), ``RemoteEmbedding``
(rows pulled on demand), ``Client.pull_rows``, and ``RemoteOptimizer(..., "LBFGS")`` with
``step(closure)`` — each bitwise equal to the same training with local torch."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve
from optserve import _tensors
from tests.conftest import ENGINES

pytestmark = pytest.mark.integration

ROWS, DIM = 200, 8


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class Recommender(nn.Module):
    """An embedding bag of ids (sparse gradients) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(ROWS, DIM, sparse=True)
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1)).squeeze(1)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    # few distinct ids per batch: duplicates within and across rows
    return [(torch.randint(0, 40, (16, 5), generator=g) * 5, torch.randn(16, generator=g))
            for _ in range(n)]


def train(model: nn.Module, opts: list[torch.optim.Optimizer], steps: int) -> list[torch.Tensor]:
    losses = []
    for ids, y in batches(steps):
        for o in opts:
            o.zero_grad()
        loss = F.mse_loss(model(ids), y)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.detach().clone())
    return losses


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("setup", ["sgd-whole-model", "sparseadam-and-adam"])
def test_remote_optimizer_with_sparse_embedding_equals_local(
        engine_url: str, setup: str, binary: bool) -> None:
    """Touched rows back (``?return=touched``) on either engine: bitwise the local run."""
    with optserve.Client(engine_url, max_retries=0) as client:
        def optimizers(model: Recommender, remote: bool) -> list[torch.optim.Optimizer]:
            def make(params: Any, name: str, **kw: Any) -> torch.optim.Optimizer:
                if remote:
                    return optserve.RemoteOptimizer(params, name, client, binary=binary, **kw)
                cls = getattr(torch.optim, name)
                return cls(params, **kw)  # type: ignore[no-any-return]
            if setup == "sgd-whole-model":
                return [make(model.named_parameters(), "SGD", lr=0.5)]
            return [make(model.emb.named_parameters(), "SparseAdam", lr=0.05),
                    make(model.head.named_parameters(), "Adam", lr=0.01)]

        local_model, remote_model = Recommender(), Recommender()
        local = train(local_model, optimizers(local_model, False), 6)
        remote_opts = optimizers(remote_model, True)
        remote = train(remote_model, remote_opts, 6)
        assert all(bitwise(a, b) for a, b in zip(local, remote, strict=True))
        for (n, a), (_, b) in zip(local_model.named_parameters(), remote_model.named_parameters(),
                                  strict=True):
            assert bitwise(a.detach(), b.detach()), n
        # the session's table is the local one too (only touched rows came back)
        opt = remote_opts[0]
        assert isinstance(opt, optserve.RemoteOptimizer)
        name = "emb.weight" if setup == "sgd-whole-model" else "weight"
        table = client.get_params(opt.session_id, [name]).params[name]
        assert bitwise(table, local_model.emb.weight.detach())


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
def test_remote_embedding_equals_local_embedding(engine_url: str) -> None:
    """A table kept on the server, rows pulled per batch, stepped by SparseAdam there: the
    same losses and table as a local nn.Embedding(sparse=True) + SparseAdam, on either engine (a
    Ray-hosted session pulls its rows too)."""
    with optserve.Client(engine_url, max_retries=0) as client:
        torch.manual_seed(3)
        weight = torch.randn(ROWS, DIM)
        head_init = nn.Linear(DIM, 1)

        local_emb = nn.Embedding(ROWS, DIM, sparse=True)
        local_emb.weight.data.copy_(weight)
        local_head = nn.Linear(DIM, 1)
        local_head.load_state_dict(head_init.state_dict())
        local_opts = [torch.optim.SparseAdam(local_emb.parameters(), lr=0.05),
                      torch.optim.Adam(local_head.parameters(), lr=0.01)]

        table = optserve.RemoteEmbedding.create(client, ROWS, DIM, "SparseAdam", weight=weight,
                                                lr=0.05)
        assert (table.num_embeddings, table.embedding_dim) == (ROWS, DIM)
        remote_head = nn.Linear(DIM, 1)
        remote_head.load_state_dict(head_init.state_dict())
        head_opt = torch.optim.Adam(remote_head.parameters(), lr=0.01)

        for step, (ids, y) in enumerate(batches(6)):
            for o in local_opts:
                o.zero_grad()
            local_loss = F.mse_loss(local_head(local_emb(ids).mean(1)).squeeze(1), y)
            local_loss.backward()
            for o in local_opts:
                o.step()

            head_opt.zero_grad()
            remote_loss = F.mse_loss(remote_head(table(ids).mean(1)).squeeze(1), y)
            remote_loss.backward()
            assert bitwise(table.sparse_grad().coalesce().to_dense(),  # type: ignore[union-attr]
                           local_emb.weight.grad.coalesce().to_dense())  # type: ignore[union-attr]
            result = table.step()
            head_opt.step()
            assert result.version == step + 1
            assert bitwise(local_loss.detach(), remote_loss.detach()), step
        rows = client.pull_rows(table.session_id, {"weight": torch.arange(ROWS)})
        assert bitwise(rows.params["weight"]._values(), local_emb.weight.detach())
        with torch.no_grad():  # evaluation pulls rows, records nothing
            table(torch.tensor([[1, 2]]))
        assert table.sparse_grad() is None


def test_pull_rows(client: optserve.Client) -> None:
    start = torch.randn(ROWS, DIM)
    info = client.create_session("SGD", {"emb": start, "b": torch.zeros(3)}, options={"lr": 1.0})
    for binary in (True, False):
        few = client.pull_rows(info.id, {"emb": [5, 1, 5]}, binary=binary)  # GET
        got = few.params["emb"]
        assert got.layout == torch.sparse_coo and tuple(got.shape) == (ROWS, DIM)
        assert got._indices()[0].tolist() == [5, 1, 5]
        assert bitwise(got._values(), start[[5, 1, 5]])
        many = list(range(ROWS - 1, -1, -1)) * 2  # POST .../params/rows
        both = client.pull_rows(info.id, {"emb": many, "b": [2]}, binary=binary)
        assert bitwise(both.params["emb"]._values(), start[many])
        assert bitwise(both.params["b"]._values(), torch.zeros(1))
    # a sparse step through the client, touched rows back
    g = torch.sparse_coo_tensor(torch.tensor([[3, 3, 7]]), torch.ones(3, DIM), (ROWS, DIM),
                                check_invariants=False)
    for binary in (True, False):
        result = client.step(info.id, {"emb": g}, return_params="touched", binary=binary)
        assert result.params is not None and set(result.params) == {"emb"}
        assert result.params["emb"]._indices()[0].tolist() == [3, 7]
    ref = start.clone()
    ref.add_(g, alpha=-1.0)
    ref.add_(g, alpha=-1.0)
    assert bitwise(client.get_params(info.id, ["emb"]).params["emb"], ref)
    # without torch: numpy RowSparse out, and in
    _tensors.USE_TORCH = False
    try:
        rows = client.pull_rows(info.id, {"emb": np.array([7, 3])}).params["emb"]
        assert isinstance(rows, optserve.RowSparse) and rows.indices.tolist() == [7, 3]
        assert np.array_equal(rows.values, ref[[7, 3]].numpy())
        client.push_grads(info.id, {"emb": optserve.RowSparse(
            np.array([0]), np.ones((1, DIM), np.float32), (ROWS, DIM))})
    finally:
        _tensors.USE_TORCH = True
    assert client.get_session(info.id).accumulated == ["emb"]


# --------------------------------------------------------------------------- LBFGS
def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 6, generator=g)
    return x, x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(64, 2, generator=g)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("options", [
    {"lr": 1, "max_iter": 10, "history_size": 5},
    {"lr": 1, "max_iter": 7, "history_size": 3, "line_search_fn": "strong_wolfe"},
])
def test_remote_lbfgs_equals_torch(client: optserve.Client, options: dict[str, Any],
                                   binary: bool) -> None:
    x, y = regression_data()

    def run(remote: bool) -> tuple[nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
        opt: torch.optim.Optimizer = (
            optserve.RemoteOptimizer(model.parameters(), "LBFGS", client, binary=binary,
                                     **options)
            if remote else torch.optim.LBFGS(model.parameters(), **options))
        losses = []
        for _ in range(3):
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).detach().clone())  # type: ignore[no-untyped-call]
        return model, opt, losses

    local_model, local_opt, local_losses = run(False)
    remote_model, remote_opt, remote_losses = run(True)
    assert all(bitwise(a, b) for a, b in zip(local_losses, remote_losses, strict=True))
    for a, b in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert bitwise(a.detach(), b.detach())
        assert a.grad is not None and b.grad is not None and bitwise(a.grad, b.grad)
    # state_dict both ways: the remote state continues locally, and back
    sd = remote_opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    reloaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    local_opt2 = torch.optim.LBFGS(local_model.parameters(), **options)
    local_opt2.load_state_dict(reloaded)
    remote_opt.load_state_dict(local_opt.state_dict())

    def closure_for(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss
        return closure
    a = local_opt2.step(closure_for(local_model, local_opt2))  # type: ignore[no-untyped-call]
    b = remote_opt.step(closure_for(remote_model, remote_opt))  # type: ignore[no-untyped-call]
    assert bitwise(a.detach(), b.detach())
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert bitwise(p.detach(), q.detach())
    assert isinstance(remote_opt, optserve.RemoteOptimizer)
    with pytest.raises(TypeError, match="closure"):
        remote_opt.step()


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
@pytest.mark.parametrize("optimizer", ["SparseAdam", "Adagrad", "SGD"])
def test_narrow_wire_takes_row_sparse_gradients_too(
        client: optserve.Client, optimizer: str, wire: str) -> None:
    """``RemoteOptimizer(..., wire_dtype=...)`` narrows row-sparse gradients as it narrows
    dense ones (their values; the rows' indices stay int64): the server widens them and steps
    its float32 table as torch steps the same gradients narrowed and widened again, bit for
    bit. The touched rows come back narrowed: a local row holds the server's value narrowed
    and widened, an untouched row its own."""
    narrow = getattr(torch, wire)
    init = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(3))
    options: dict[str, Any] = {"lr": 0.05}
    steps = [torch.randint(0, 40, (16, 5), generator=torch.Generator().manual_seed(k)) * 5
             for k in range(4)]
    upstream = [torch.randn(16, 5, DIM, generator=torch.Generator().manual_seed(100 + k))
                for k in range(4)]

    def grad_of(emb: nn.Embedding, k: int) -> None:
        emb.zero_grad()
        (emb(steps[k]) * upstream[k]).sum().backward()

    master = nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=True)
    local = getattr(torch.optim, optimizer)(master.parameters(), **options)
    for k in range(4):
        grad_of(master, k)
        g = master.weight.grad
        assert g is not None and g.layout == torch.sparse_coo
        master.weight.grad = g.to(narrow).to(torch.float32)
        local.step()
    touched = torch.unique(torch.cat([s.flatten() for s in steps]))

    model = nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=True)
    remote = optserve.RemoteOptimizer(model.named_parameters(), optimizer, client,
                                      wire_dtype=wire, **options)
    sizes: list[int] = []
    real_step = client._step_http  # (RemoteOptimizer's way to HTTP)

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = args[1]
        sizes.extend(g._values().element_size() for g in grads.values())
        return real_step(*args, **kwargs)
    client._step_http = step  # type: ignore[method-assign]
    try:
        for k in range(4):
            grad_of(model, k)
            remote.step()
    finally:
        del client._step_http
    assert sizes == [narrow.itemsize] * 4  # the values travelled narrowed
    server = client.get_params(remote.session_id, ["weight"]).params["weight"]
    assert bitwise(server, master.weight.detach())
    expected = init.clone()
    expected[touched] = master.weight.detach()[touched].to(narrow).to(torch.float32)
    assert bitwise(model.weight.detach(), expected)
    remote.close(delete_session=True)


def test_float16_wire_row_sparse_values_past_its_range(client: optserve.Client) -> None:
    """``wire_dtype="float16"`` with row-sparse gradients: a value past float16's range is a
    ``ValueError`` naming the gradient, nothing sent; a touched row past that range comes back
    infinite in the narrowed answer and is pulled again at its own width (the local table
    equals the server's, not inf)."""
    init = torch.tensor([[70000.0, 1.0], [0.5, 0.25], [2.0, -2.0]])
    model = nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=True)
    remote = optserve.RemoteOptimizer(model.named_parameters(), "SGD", client, lr=1.0,
                                      wire_dtype="float16")
    model.weight.grad = torch.sparse_coo_tensor([[1]], [[1e5, 0.0]], (3, 2),
                                                    check_invariants=True)
    with pytest.raises(ValueError, match="'weight'.*float16's range"):
        remote.step()
    assert client.get_session(remote.session_id).version == 0
    master = init.clone()
    master[[0, 1]] -= torch.tensor([[0.5, 0.25], [0.25, 0.5]])  # (exact in float16)
    model.weight.grad = torch.sparse_coo_tensor([[0, 1]], [[0.5, 0.25], [0.25, 0.5]],
                                                    (3, 2), check_invariants=True)
    remote.step()
    server = client.get_params(remote.session_id, ["weight"]).params["weight"]
    assert bitwise(server, master)
    assert bitwise(model.weight.detach(), master)  # [69999.5, 0.75]: not [inf, 0.75]
    remote.close(delete_session=True)
