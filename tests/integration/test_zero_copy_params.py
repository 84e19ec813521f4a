"""``RemoteOptimizer(zero_copy=True)``, the default over the same-host transport: a
parameter's memory becomes its slot in the session's shared segment, the server writes the
new values straight into it, and training is bitwise torch's. Parameters something else views
keep their memory and are copied into; autograd still refuses a graph the step changed; a new
binding moves them again; a forked child gets a snapshot of them, not the parent's memory."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from conftest import LiveServer, _test_settings

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # durability "step" (the server's default): the slots are written once the step is durable
    live = LiveServer(_test_settings(durability="step"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    local = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return local, copy.deepcopy(local)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(1000 + k)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def slots(opt: optserve.RemoteOptimizer) -> dict[str, torch.Tensor]:
    channel = opt.client._local_channel()
    assert channel is not None, "a loopback client steps through shared memory"
    return channel._bindings[opt.session_id].params


def assert_same(local: torch.nn.Module, remote: torch.nn.Module) -> None:
    for (name, p), q in zip(local.named_parameters(), remote.parameters(), strict=True):
        assert torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8)), name


OPTIMIZERS = [("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adam", {"lr": 1e-2})]


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize(("name", "options"), OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_parameters_live_in_their_slots_and_train_as_torch(server: str, name: str,
                                                            options: dict[str, float],
                                                            zero_copy: bool) -> None:
    local_model, remote_model = models(0)
    own = [p.data_ptr() for p in remote_model.parameters()]
    local = getattr(torch.optim, name)(local_model.parameters(), **options)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), name, c,
                                          zero_copy=zero_copy, **options)
        versions = [p._version for p in remote_model.parameters()]
        for k in range(5):
            train(local_model, local, k)
            train(remote_model, remote, k)
            assert_same(local_model, remote_model)
            at = slots(remote)
            for (pname, p), before, mine in zip(remote_model.named_parameters(), versions, own,
                                                strict=True):
                slot = at[pname]
                if zero_copy:  # no copy: the server wrote the values where they live
                    assert p.data_ptr() == slot.data_ptr(), pname
                else:
                    assert p.data_ptr() == mine != slot.data_ptr(), pname
                assert p._version > before, "a step bumps the version as a copy would"
            versions = [p._version for p in remote_model.parameters()]
        remote.close(delete_session=True)


def test_a_parameter_something_else_views_keeps_its_memory(server: str) -> None:
    local_model, remote_model = models(1)
    w, b = remote_model[0].weight, remote_model[0].bias
    row, kept = w[0], b.data  # views of two parameters' memory, held by the training code
    local = torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "SGD", c, lr=0.1,
                                          momentum=0.9)
        for k in range(3):
            train(local_model, local, k)
            train(remote_model, remote, k)
            assert_same(local_model, remote_model)
            at = slots(remote)
            assert w.data_ptr() == row.data_ptr() != at["0.weight"].data_ptr()
            assert b.data_ptr() == kept.data_ptr() != at["0.bias"].data_ptr()
            assert remote_model[2].weight.data_ptr() == at["2.weight"].data_ptr()
            assert torch.equal(row, local_model[0].weight[0].detach())  # the view sees them
            assert torch.equal(kept, local_model[0].bias.detach())
        remote.close(delete_session=True)


def test_autograd_refuses_a_graph_the_step_changed_as_torch_does(server: str) -> None:
    local_model, remote_model = models(2)
    local = torch.optim.SGD(local_model.parameters(), lr=0.1)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "SGD", c, lr=0.1)
        train(remote_model, remote, 0)  # moved into the segment
        assert remote_model[0].weight.data_ptr() == slots(remote)["0.weight"].data_ptr()
        for model, opt in ((local_model, local), (remote_model, remote)):
            w = model[0].weight
            kept = (w * w).sum()  # saves w for its backward
            w.grad = torch.ones_like(w)
            opt.step()
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                kept.backward()
        remote.close(delete_session=True)


def test_a_new_binding_moves_the_parameters_again(server: str) -> None:
    local_model, remote_model = models(3)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c, lr=1e-2)
        for k in range(2):
            train(local_model, local, k)
            train(remote_model, remote, k)
        first = {n: t.data_ptr() for n, t in slots(remote).items()}
        channel = c._local_channel()
        assert channel is not None
        channel.release(remote.session_id)  # its segment let go (as a stale binding is)
        for k in range(2, 4):
            train(local_model, local, k)
            train(remote_model, remote, k)
            assert_same(local_model, remote_model)
        again = slots(remote)
        for name, p in remote_model.named_parameters():
            assert p.data_ptr() == again[name].data_ptr() != first[name], name
        remote.close(delete_session=True)


def test_a_forked_child_gets_a_snapshot_not_the_segment(server: str) -> None:
    """The segment is shared memory: without its own copy at the fork, a child would see the
    parent's later steps in its parameters, and the parent its writes into them."""
    local_model, remote_model = models(4)
    local = torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "SGD", c, lr=0.1,
                                          momentum=0.9)
        train(local_model, local, 0)
        train(remote_model, remote, 0)
        w = remote_model[0].weight
        assert w.data_ptr() == slots(remote)["0.weight"].data_ptr()
        at_fork = w.detach().clone()
        stepped_r, stepped_w = os.pipe()
        said_r, said_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: says "ok" when its parameter kept the values of the fork
            said = b"no answer"
            try:
                os.close(stepped_w)
                os.read(stepped_r, 1)  # the parent has stepped
                said = (b"ok" if torch.equal(w.detach(), at_fork)
                        else b"the child saw the parent's step")
                with torch.no_grad():
                    w.fill_(7.0)  # must not reach the parent
            except BaseException as exc:  # noqa: BLE001 - said to the parent
                said = repr(exc).encode()[:500]
            finally:
                os.write(said_w, said)
                os._exit(0)
        os.close(stepped_r)
        os.close(said_w)
        train(local_model, local, 1)
        train(remote_model, remote, 1)
        os.write(stepped_w, b"x")
        os.close(stepped_w)
        os.waitpid(pid, 0)
        said = os.read(said_r, 1000)
        os.close(said_r)
        assert said == b"ok", said
        assert_same(local_model, remote_model)
        train(local_model, local, 2)
        train(remote_model, remote, 2)
        assert_same(local_model, remote_model)
        remote.close(delete_session=True)


def test_parameters_in_their_slots_can_be_swapped_as_torch_swaps_them(server: str) -> None:
    """``torch.utils.swap_tensors`` on a parameter living in its slot (what ``load_state_dict``
    and ``Module.to`` do under ``torch.__future__.set_swap_module_params_on_conversion``): it
    works as on a local optimizer's parameter, the new values reach the session and training
    goes on as torch's. It raised ``RuntimeError`` ("Cannot swap t1 because it has weakref
    associated with it"): the SDK held a weak reference to every moved parameter."""
    local_model, remote_model = models(9)
    checkpoint = copy.deepcopy(local_model.state_dict())
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c, lr=1e-2)
        try:
            torch.__future__.set_swap_module_params_on_conversion(True)
            for k in range(4):
                train(local_model, local, k)
                train(remote_model, remote, k)
                assert_same(local_model, remote_model)
                if k == 0:
                    weight = remote_model.get_parameter("0.weight")
                    assert weight.data_ptr() == slots(remote)["0.weight"].data_ptr()
                    for model in (local_model, remote_model):
                        model.load_state_dict(checkpoint)
                if k == 1:
                    for model in (local_model, remote_model):
                        bias = model.get_parameter("2.bias")
                        torch.utils.swap_tensors(  # type: ignore[no-untyped-call]
                            bias, torch.nn.Parameter(torch.full_like(bias, 0.25)))
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swapping)
        remote.close(delete_session=True)


def test_parameters_moved_to_shared_memory_keep_training_as_torch(server: str) -> None:
    """``Module.share_memory()`` (and ``torch.multiprocessing``'s pickling of a parameter,
    which does the same) on parameters living in their slots moves their memory to torch's
    shared memory in place: the next steps copy the new values into them, as torch's
    optimizer goes on updating them. It moved the binding's view of each slot along (one
    storage), so the views no longer showed the segment the server writes: every later step
    left the parameters as they were."""
    local_model, remote_model = models(10)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c, lr=1e-2)
        for k in range(4):
            train(local_model, local, k)
            train(remote_model, remote, k)
            assert_same(local_model, remote_model)
            if k == 1:
                at = {name: slot.data_ptr() for name, slot in slots(remote).items()}
                assert remote_model.get_parameter("0.weight").data_ptr() == at["0.weight"]
                remote_model.share_memory()
                assert all(p.untyped_storage().is_shared() for p in remote_model.parameters())
                assert {name: slot.data_ptr() for name, slot in slots(remote).items()} == at
        remote.close(delete_session=True)


def test_a_parameter_in_one_optimizers_slot_stays_out_of_anothers(server: str) -> None:
    """Two optimizers stepping the same parameters (as torch's can): each parameter lives in
    the slot of the one that stepped it first; the other copies into it (its segment never
    takes memory an optimizer's record holds), and both train as torch's."""
    local_model, remote_model = models(11)
    firsts = [torch.optim.Adam(local_model.parameters(), lr=1e-2),
              torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)]
    with optserve.Client(server, transport="local") as c:
        remotes = [optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c, lr=1e-2),
                   optserve.RemoteOptimizer(remote_model.named_parameters(), "SGD", c, lr=0.1,
                                            momentum=0.9)]
        for k in range(3):
            for model, opts in ((local_model, firsts), (remote_model, remotes)):
                train(model, opts[0], k)
                opts[1].step()
            assert_same(local_model, remote_model)
            at = slots(remotes[0])
            for name, p in remote_model.named_parameters():
                assert p.data_ptr() == at[name].data_ptr(), name
        for remote in remotes:
            remote.close(delete_session=True)


def test_edits_in_place_between_steps_reach_the_session(server: str) -> None:
    """A parameter living in its slot, edited in place between steps (weight clipping,
    ``load_state_dict``): the edit is sent before the next step, as for any parameter."""
    local_model, remote_model = models(5)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    with optserve.Client(server, transport="local") as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c, lr=1e-2)
        saved = copy.deepcopy(local_model.state_dict())
        for k in range(4):
            train(local_model, local, k)
            train(remote_model, remote, k)
            assert remote_model[0].weight.data_ptr() == slots(remote)["0.weight"].data_ptr()
            for model in (local_model, remote_model):
                if k == 1:
                    model.load_state_dict(saved)
                with torch.no_grad():
                    for p in model.parameters():
                        p.clamp_(-0.2, 0.2)
            assert_same(local_model, remote_model)
        remote.push_params(only_edited=True)  # (the last edits: sent before a next step)
        pulled = c.get_params(remote.session_id)
        for name, p in local_model.named_parameters():
            assert torch.equal(pulled.params[name], p.detach()), name
        remote.close(delete_session=True)
