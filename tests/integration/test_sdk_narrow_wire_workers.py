"""``RemoteOptimizer(..., worker=..., wire_dtype=...)`` in parameter-server sessions: the
model holds the session's values narrowed to the wire's dtype whenever it takes them from the
session (a step's answer, joining the session, ``pull_params()`` after a refused stale push),
and the session's float32 master weights step on the workers' narrowed gradients widened
again. Compared bit for bit with an in-process torch run that narrows the same way (each
worker's model holds the master weights narrowed and widened; its gradients are narrowed and
widened; a sync round's mean is the sum in ascending worker order divided by K, as the
server documents it)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve

pytestmark = pytest.mark.integration

WORKERS = 3


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def grads_at(model: nn.Module, worker: int, i: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def narrowed(t: torch.Tensor, wire: str) -> torch.Tensor:
    return t.to(getattr(torch, wire)).to(t.dtype)


def hold(model: nn.Module, master: list[torch.Tensor], wire: str) -> None:
    """The model takes the session's values, narrowed as the wire carries them."""
    with torch.no_grad():
        for p, m in zip(model.parameters(), master, strict=True):
            p.copy_(narrowed(m, wire))


def session_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_sync_round_workers_hold_and_step_narrowed_values(live_server: str,
                                                          client: optserve.Client,
                                                          wire: str) -> None:
    """Three workers of sync rounds (mean), each in its own thread and client. The workers
    joined the session holding its values narrowed, so their first round's gradients are
    taken there as every later round's: the session's master weights, its Adam state and each
    worker's parameters equal torch's run bit for bit after four rounds (before, a joining
    worker held the master weights themselves, and the first round's gradients differed)."""
    rounds = 4
    work = mlp()
    master = [p.detach().clone() for p in work.parameters()]
    local = torch.optim.Adam(master, lr=1e-2)
    for i in range(rounds):
        hold(work, master, wire)
        per = [[narrowed(g, wire) for g in grads_at(work, k, i)] for k in range(WORKERS)]
        for j, m in enumerate(master):
            acc = per[0][j].clone()
            for k in range(1, WORKERS):
                acc.add_(per[k][j])
            m.grad = acc.div_(WORKERS)
        local.step()

    sid = f"narrow-sync-{uuid.uuid4().hex[:8]}"
    client.create_session("Adam", params=session_params(mlp()), id=sid, options={"lr": 1e-2},
                          sync={"workers": WORKERS, "reduce": "mean", "timeout_s": 60})
    models: list[nn.Module | None] = [None] * WORKERS
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with optserve.Client(live_server, max_retries=0) as c:
                model = mlp()
                opt = optserve.RemoteOptimizer(model.named_parameters(), client=c,
                                               session_id=sid, worker=f"w{k}", wire_dtype=wire)
                for i in range(rounds):
                    grads_at(model, k, i)
                    opt.step()
                models[k] = model
        except BaseException as exc:  # reported below
            failures.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    server = client.get_params(sid).params
    for (name, _), want in zip(mlp().named_parameters(), master, strict=True):
        assert torch.equal(server[name], want), name
    for k, model in enumerate(models):
        assert model is not None
        for p, want in zip(model.parameters(), master, strict=True):
            assert torch.equal(p, narrowed(want, wire)), k
    with optserve.Client(live_server, max_retries=0) as c:
        reader = optserve.RemoteOptimizer(mlp().named_parameters(), client=c, session_id=sid,
                                          worker="reader", wire_dtype=wire)
        mine, torchs = reader.state_dict(), local.state_dict()
    for pid, entry in torchs["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(mine["state"][pid][key]), value), (pid, key)
        assert torch.equal(mine["master_params"][pid], master[pid]), pid
    client.delete_session(sid)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_async_worker_pulls_narrowed_values_after_a_stale_push(client: optserve.Client,
                                                               wire: str) -> None:
    """Two async workers (``max_staleness=1``, ``staleness_lr="inverse"``) stepping in a fixed
    order; a push one version old steps with half the lr, a push two versions old is refused
    (``stale_gradient``) and the worker calls ``pull_params()``, as the parameter-server
    example does. The pulled values are the session's narrowed, as a step's answer holds them
    (before, the model held the master weights at full width after a pull or a join, and its
    next gradient was taken there), so the session and both models equal torch's run bit for
    bit."""
    order = [0, 0, 1, 1, 0, 1, 1, 0]
    work = [mlp() for _ in range(2)]
    master = [p.detach().clone() for p in mlp().parameters()]
    local = torch.optim.SGD(master, lr=0.05, momentum=0.9)
    for model in work:
        hold(model, master, wire)
    version, seen, want_log = 0, [0, 0], []
    for i, k in enumerate(order):
        g = grads_at(work[k], k, i)
        if version - seen[k] > 1:
            want_log.append((k, "stale_gradient"))
        else:
            for m, gk in zip(master, g, strict=True):
                m.grad = narrowed(gk, wire)
            # staleness_lr="inverse": a push s versions old steps with lr / (1 + s)
            local.param_groups[0]["lr"] = 0.05 / (1.0 + (version - seen[k]))
            local.step()
            version += 1
            want_log.append((k, version))
        hold(work[k], master, wire)
        seen[k] = version

    sid = f"narrow-async-{uuid.uuid4().hex[:8]}"
    client.create_session("SGD", params=session_params(mlp()), id=sid,
                          options={"lr": 0.05, "momentum": 0.9}, max_staleness=1,
                          staleness_lr="inverse")
    models = [mlp() for _ in range(2)]
    opts = [optserve.RemoteOptimizer(m.named_parameters(), client=client, session_id=sid,
                                     worker=f"w{k}", wire_dtype=wire)
            for k, m in enumerate(models)]
    for model in models:  # joined: the session's values, narrowed
        for p, initial in zip(model.parameters(), mlp().parameters(), strict=True):
            assert torch.equal(p, narrowed(initial.detach(), wire))
    log: list[tuple[int, int | str]] = []
    for i, k in enumerate(order):
        grads_at(models[k], k, i)
        try:
            opts[k].step()
            log.append((k, opts[k].version))
        except optserve.ConflictError as exc:
            log.append((k, str(exc.code)))
            opts[k].pull_params()
    assert log == want_log
    assert "stale_gradient" in {entry[1] for entry in log}
    server = client.get_params(sid).params
    for (name, _), want in zip(mlp().named_parameters(), master, strict=True):
        assert torch.equal(server[name], want), name
    for mine, theirs in zip(models, work, strict=True):
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b)
    for opt in opts:
        opt.close()
    client.delete_session(sid)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_a_worker_joining_a_sharded_session_steps_it_narrowed(client: optserve.Client,
                                                              wire: str) -> None:
    """A sharded session takes the narrow wire as an unsharded one (each shard widens its
    part of the gradients, ``?upcast=true``, and narrows its part of the answer,
    ``?params_dtype=``). A worker joining one with ``wire_dtype`` holds its values narrowed
    and steps it on narrowed gradients: the session's master weights equal torch's run on
    the narrowed-and-widened gradients bit for bit, and the model holds them narrowed (before,
    the join was a ``ValueError``: the session took no narrow wire)."""
    steps = 3
    work = mlp()
    master = [p.detach().clone() for p in work.parameters()]
    local = torch.optim.Adam(master, lr=1e-2)
    for i in range(steps):
        hold(work, master, wire)
        for m, g in zip(master, grads_at(work, 0, i), strict=True):
            m.grad = narrowed(g, wire)
        local.step()

    sid = f"narrow-sharded-{uuid.uuid4().hex[:8]}"
    client.create_session("Adam", params=session_params(mlp()), id=sid, shards=2,
                          options={"lr": 1e-2})
    model = mlp()
    remote = optserve.RemoteOptimizer(model.named_parameters(), client=client, session_id=sid,
                                      worker="w0", wire_dtype=wire)
    for i in range(steps):
        grads_at(model, 0, i)
        remote.step()
    server = client.get_params(sid).params
    for (name, _), want in zip(mlp().named_parameters(), master, strict=True):
        assert torch.equal(server[name], want), name
    for p, want in zip(model.parameters(), master, strict=True):
        assert torch.equal(p, narrowed(want, wire))
    remote.close()
    client.delete_session(sid)


def test_a_pulled_value_past_float16s_range_stays_at_its_own_width(
        client: optserve.Client) -> None:
    """``wire_dtype="float16"``: a worker joining (and pulling) takes the parameters narrowed,
    except one that would narrow to an infinity (a value past 65504): that one keeps the
    session's value at its own width, as a step's answer pulls it again."""
    sid = f"narrow-range-{uuid.uuid4().hex[:8]}"
    big, small = torch.tensor([70000.0, 1.0001]), torch.tensor([0.1, -0.3])
    client.create_session("SGD", params={"big": big, "small": small}, id=sid,
                          options={"lr": 0.5})
    mine = [torch.zeros(2), torch.zeros(2)]
    opt = optserve.RemoteOptimizer([("big", mine[0]), ("small", mine[1])], client=client,
                                   session_id=sid, worker="w0", wire_dtype="float16")
    assert torch.equal(mine[0], big)  # not [inf, 1.0]
    assert torch.equal(mine[1], narrowed(small, "float16"))
    client.put_params(sid, {"big": torch.tensor([1.0001, 2.0]),
                            "small": torch.tensor([70000.0, 0.2])})
    opt.pull_params()
    assert torch.equal(mine[0], narrowed(torch.tensor([1.0001, 2.0]), "float16"))
    assert torch.equal(mine[1], torch.tensor([70000.0, 0.2]))
    opt.close()
    client.delete_session(sid)
