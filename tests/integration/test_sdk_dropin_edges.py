"""``RemoteOptimizer`` where torch code leans on details of a local ``torch.optim`` optimizer:
the order of a param group's keys (options passed in any order, keys of one's own, named
parameters) in ``param_groups`` and ``state_dict()``, which a ``torch.save`` of it keeps;
a checkpoint written by an older torch, whose groups lack options added since (torch's
``load_state_dict`` fills them in); and a group's ``"params"`` list edited by hand, which
torch steps as it then stands and a session cannot (a clear ``ValueError``, nothing sent).
Each run is compared with the same run on the local ``torch.optim`` optimizer."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def backward(model: nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    F.mse_loss(model(x), y).backward()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        backward(model, i)
        opt.step()


def assert_same_form(a: Any, b: Any, where: str = "", ordered: bool = True) -> None:
    """``a`` and ``b`` equal, of the same types and with their keys in the same order all the
    way down (tensors bitwise); ``ordered=False``: a dict's keys as a set."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        if ordered:
            assert list(a) == list(b), f"{where}: {list(a)} vs {list(b)}"
        else:
            assert set(a) == set(b), f"{where}: {list(a)} vs {list(b)}"
        for k in a:
            assert_same_form(a[k], b[k], f"{where}.{k}", ordered)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_form(x, y, f"{where}[{i}]", ordered)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_trained_alike(local_model: nn.Module, local: torch.optim.Optimizer,
                         remote_model: nn.Module, remote: Any) -> None:
    """The two models' parameters bitwise equal, and the optimizers' state dicts of one form
    (:func:`assert_same_form`)."""
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_form(local.state_dict(), remote.state_dict())


def saved(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return dict(torch.load(buffer, weights_only=True))


Groups = Callable[[nn.Sequential], Any]
GROUPS: dict[str, tuple[str, Groups, dict[str, Any]]] = {
    # options passed in another order than the class makes its defaults in
    "kwargs order": ("SGD", lambda m: m.parameters(),
                     {"weight_decay": 0.01, "lr": 0.1, "momentum": 0.9}),
    # a key of one's own first in a group, the group's own lr after it
    "own keys": ("AdamW", lambda m: [{"params": m[0].parameters(), "name": "body"},
                                     {"name": "head", "params": m[2].parameters(),
                                      "lr": 0.5}], {"lr": 1e-2}),
    # named parameters: torch keeps param_names beside the options, "params" last
    "named": ("Adam", lambda m: [{"params": list(m[0].named_parameters()), "tag": 1},
                                 {"params": list(m[2].named_parameters())}],
              {"betas": (0.8, 0.9), "lr": 1e-2}),
}


@pytest.mark.parametrize("case", list(GROUPS))
def test_group_keys_keep_torchs_order_in_param_groups_and_state_dict(
        client: optserve.Client, case: str) -> None:
    """The keys of ``param_groups`` and of ``state_dict()["param_groups"]`` come in the order
    torch's own optimizer holds them, before and after a checkpoint loaded back, so a
    checkpoint's ``torch.save`` is torch's (the state dict packed the session's options first
    and the local keys after them, ``param_names`` after ``params``; the groups held options
    in the order they were passed)."""
    optimizer, groups, options = GROUPS[case]
    local_model, remote_model = mlp(), mlp()
    local = getattr(torch.optim, optimizer)(groups(local_model), **options)
    remote = optserve.RemoteOptimizer(groups(remote_model), optimizer, client, **options)
    for a, b in zip(local.param_groups, remote.param_groups, strict=True):
        assert list(a) == list(b)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    assert_same_form(saved(local.state_dict()), saved(remote.state_dict()))
    for model, opt in ((local_model, local), (remote_model, remote)):
        opt.load_state_dict(saved(opt.state_dict()))
        train(model, opt, range(2, 3))
    for a, b in zip(local.param_groups, remote.param_groups, strict=True):
        assert list(a) == list(b)
    assert_same_form(saved(local.state_dict()), saved(remote.state_dict()))
    remote.close(delete_session=True)


def older_torch(sd: dict[str, Any], optimizer: type[torch.optim.Optimizer]
                ) -> dict[str, Any]:
    """``sd`` as an older torch saved it: without the group options its class's
    ``__setstate__`` fills in (those added to torch since), found by removing each and
    seeing whether torch's own ``load_state_dict`` puts it back as it was."""
    sd = copy.deepcopy(sd)
    for key in list(sd["param_groups"][0]):
        trial = copy.deepcopy(sd)
        for group in trial["param_groups"]:
            del group[key]
        probe = optimizer(mlp().parameters())
        try:
            probe.load_state_dict(trial)
        except (KeyError, ValueError):
            continue
        if all(key in group and group[key] == kept[key]
               for group, kept in zip(probe.param_groups, sd["param_groups"], strict=True)):
            for group in sd["param_groups"]:
                del group[key]
    return sd


@pytest.mark.parametrize("optimizer, options", [
    ("Adam", {"lr": 1e-2, "amsgrad": True}), ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("RMSprop", {"lr": 1e-2, "centered": True})])
def test_a_checkpoint_of_an_older_torch_lacking_newer_options_loads(
        client: optserve.Client, optimizer: str, options: dict[str, Any]) -> None:
    """A state dict whose groups lack the options torch added since it was written
    (``maximize``, ``foreach``, ``differentiable``, ``fused``, ...) loads into a
    ``RemoteOptimizer`` as into torch's own, which fills them in with their defaults; training
    then goes on bit for bit (it was a 422 ``param group 0 lacks option(s) ...``)."""
    cls = getattr(torch.optim, optimizer)
    local_model, remote_model = mlp(), mlp()
    trained = cls(local_model.parameters(), **options)
    train(local_model, trained, range(3))
    checkpoint = older_torch(trained.state_dict(), cls)
    assert len(checkpoint["param_groups"][0]) < len(trained.state_dict()["param_groups"][0])
    remote_model.load_state_dict(local_model.state_dict())
    local = cls(local_model.parameters(), lr=1.0)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer, client, lr=1.0)
    local.load_state_dict(copy.deepcopy(checkpoint))
    remote.load_state_dict(saved(checkpoint))
    for a, b in zip(local.param_groups, remote.param_groups, strict=True):
        assert_same_form({k: v for k, v in a.items() if k != "params"},
                         {k: v for k, v in b.items() if k != "params"})
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 6))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


EDITS: dict[str, Callable[[nn.Sequential, list[Any]], None]] = {
    "appended": lambda m, params: params.append(m[2].weight),
    "removed": lambda m, params: params.pop(),
    "replaced": lambda m, params: params.__setitem__(0, nn.Parameter(params[0].detach() * 2)),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_groups_params_list_edited_by_hand_is_refused_saying_what_to_do(
        client: optserve.Client, edit: str) -> None:
    """A parameter appended to, removed from or replaced in a group's ``"params"`` list (torch
    steps the list as it stands; the session holds the parameters it was made with) is a
    ``ValueError`` naming the group and ``add_param_group`` at the next step, ``state_dict()``
    or ``load_state_dict()``, with nothing sent: the session's parameters and state stay as
    they were, equal to torch's run up to the edit, and once the list is put back training
    goes on as torch's (an append or removal was a bare ``zip()`` error, a replacement a
    silently different training)."""
    local_model = nn.Sequential(mlp()[0], nn.Tanh(), mlp()[2])
    remote_model = nn.Sequential(mlp()[0], nn.Tanh(), mlp()[2])
    local = torch.optim.Adam(local_model[0].parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model[0].parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    version = client.get_session(remote.session_id).version
    kept = list(remote.param_groups[0]["params"])
    EDITS[edit](remote_model, remote.param_groups[0]["params"])
    for call in (remote.step, remote.state_dict,
                 lambda: remote.load_state_dict(local.state_dict())):
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] .*add_param_group"):
            call()
    assert client.get_session(remote.session_id).version == version
    remote.param_groups[0]["params"][:] = kept
    remote.param_groups[0]["params"] = tuple(kept)  # the same parameters: as torch takes them
    local.param_groups[0]["params"] = tuple(local.param_groups[0]["params"])
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2, 4))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def test_param_names_a_session_cannot_take_train_as_torchs(client: optserve.Client) -> None:
    """torch's ``param_names`` are labels: an empty one, one past the session's 512
    characters (twice), the wire formats' ``"__metadata__"`` train as torch's, their groups
    and state dict keeping the names given (each was a 422 ``invalid_name`` at
    construction)."""
    names = ["", "w" * 600, "w" * 600, "__metadata__", "#", "bias"]
    torch.manual_seed(0)
    values = [torch.randn(3) for _ in names]
    local_params = [nn.Parameter(v.clone()) for v in values]
    remote_params = [nn.Parameter(v.clone()) for v in values]
    local = torch.optim.Adam(list(zip(names, local_params, strict=True)), lr=0.1)
    remote = optserve.RemoteOptimizer(list(zip(names, remote_params, strict=True)), "Adam",
                                      client, lr=0.1)
    for params, opt in ((local_params, local), (remote_params, remote)):
        for i in range(3):
            opt.zero_grad()
            sum((p * (k + i + 1)).pow(2).sum() for k, p in enumerate(params)).backward()
            opt.step()
    for p, q in zip(local_params, remote_params, strict=True):
        assert torch.equal(p, q)
    assert_same_form(saved(local.state_dict()), saved(remote.state_dict()))
    assert remote.param_groups[0]["param_names"] == names
    remote.close(delete_session=True)


STATE_EDITS: dict[str, Callable[[torch.optim.Optimizer, list[nn.Parameter]], Any]] = {
    # moments reset in place (dead-neuron re-initialisation, GaLore-style resets)
    "zeroed in place": lambda opt, ps: opt.state[ps[0]]["exp_avg"].zero_(),
    "step count reset": lambda opt, ps: opt.state[ps[1]]["step"].fill_(0),
    "key assigned": lambda opt, ps: opt.state[ps[2]].__setitem__(
        "exp_avg_sq", torch.ones_like(ps[2])),
    "entry deleted": lambda opt, ps: opt.state.__delitem__(ps[3]),
    "entry cleared": lambda opt, ps: opt.state[ps[0]].clear(),
    "one popped": lambda opt, ps: opt.state.pop(ps[1]),
    "all cleared": lambda opt, ps: opt.state.clear(),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
def test_edits_of_the_state_take_effect_as_in_torch(client: optserve.Client, edit: str) -> None:
    """``opt.state`` edited between steps (a moment zeroed in place, a step count reset, a key
    assigned, an entry deleted, popped or cleared, the whole state cleared) changes the next
    steps and the state dict as it changes a local optimizer's: the edit is sent before the
    next ``state_dict()`` or step, as one import of the state as it stands. They stayed local
    (a copy replaced at the next fetch), the training going on as if nothing was edited."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2, amsgrad=True)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2,
                                      amsgrad=True)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3))
        STATE_EDITS[edit](opt, list(model.parameters()))
    assert_same_form(local.state_dict(), remote.state_dict())
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3, 6))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def reinit_row(opt: torch.optim.Optimizer, ps: list[nn.Parameter], only_edited: bool) -> None:
    """A dead unit re-initialised: its weight row and its moments zeroed, the weights pushed
    (a remote optimizer's ``push_params``), then the next layer's moments of it zeroed."""
    with torch.no_grad():
        ps[0][3].zero_()
    opt.state[ps[0]]["exp_avg"][3].zero_()
    if isinstance(opt, optserve.RemoteOptimizer):
        opt.push_params(only_edited=only_edited)
    opt.state[ps[2]]["exp_avg"][:, 3].zero_()


@pytest.mark.parametrize("only_edited", [False, True])
def test_a_state_edit_before_push_params_is_kept_as_in_torch(client: optserve.Client,
                                                             only_edited: bool) -> None:
    """An ``opt.state`` edit, then ``push_params()``, then ``opt.state`` read again (another
    edit): the first edit takes effect at the next step as in torch. The push's newer session
    version made the read fetch the state again, which dropped the edit not yet sent (the
    training went on as if the moments were never zeroed)."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(3))
        reinit_row(opt, list(model.parameters()), only_edited)
        train(model, opt, range(3, 5))
    assert_trained_alike(local_model, local, remote_model, remote)
    remote.close(delete_session=True)


def test_state_entries_given_back_unchanged_send_nothing(client: optserve.Client) -> None:
    """Lightning's ``_optimizer_to_device`` puts each entry back as a new dict of the same
    tensors (``.to(device)`` of a tensor already there is itself): no edit, so nothing is
    imported; the session's version moves by the steps only."""
    model = mlp()
    opt = optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=1e-2)
    train(model, opt, range(2))
    for p, entry in list(opt.state.items()):
        opt.state[p] = {k: v.to("cpu") for k, v in entry.items()}
    train(model, opt, range(2, 4))
    opt.state_dict()
    assert client.get_session(opt.session_id).version == opt.version == 4
    opt.close(delete_session=True)


def test_the_optimizer_given_as_torchs_class_or_by_mistake_a_learning_rate(
        client: optserve.Client) -> None:
    """``RemoteOptimizer(params, torch.optim.AdamW, ...)`` (code that makes its optimizer from a
    class) steps as ``AdamW``; a learning rate passed where ``torch.optim.AdamW(params, 1e-3)``
    takes it is a ``TypeError`` saying to pass ``lr=`` (it was ``attribute name must be string,
    not 'float'``), before any session is made."""
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.AdamW(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), torch.optim.AdamW, client,
                                      lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    assert_same_form(local.state_dict(), remote.state_dict())
    remote.close(delete_session=True)
    sessions = len(client.list_sessions())
    with pytest.raises(TypeError, match=r"lr=0\.001"):
        optserve.RemoteOptimizer(mlp().parameters(), 1e-3, client)  # type: ignore[arg-type]
    assert len(client.list_sessions()) == sessions


def test_a_worker_joined_without_naming_the_optimizer_loads_as_the_sessions_class(
        client: optserve.Client) -> None:
    """A parameter-server worker passes no ``optimizer`` (its default says ``"Adam"``): it
    takes the session's (``SGD``), so a state dict it loads is filled and split as SGD's, its
    groups holding what torch's SGD holds (filled as Adam's, they took Adam's ``amsgrad``,
    ``capturable`` and ``decoupled_weight_decay``)."""
    local_model, creator_model, worker_model = mlp(), mlp(), mlp()
    local = torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)
    creator = optserve.RemoteOptimizer(creator_model.named_parameters(), "SGD", client,
                                       lr=0.1, momentum=0.9)
    for model, opt in ((local_model, local), (creator_model, creator)):
        train(model, opt, range(2))
    worker = optserve.RemoteOptimizer(worker_model.named_parameters(), client=client,
                                      session_id=creator.session_id, worker="w1")
    worker.load_state_dict(saved(local.state_dict()))
    assert set(worker.param_groups[0]) - {"param_names"} == set(local.param_groups[0])
    creator.pull_params()
    for model, opt in ((local_model, local), (creator_model, creator)):
        train(model, opt, range(2, 3))
    for p, q in zip(local_model.parameters(), creator_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_form(local.state_dict()["state"], creator.state_dict()["state"])
    creator.close(delete_session=True)


@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
def test_the_class_is_named_after_the_sessions_optimizer(client: optserve.Client,
                                                         optimizer: str) -> None:
    """``type(opt).__name__`` is the session's optimizer's, as torch's is, so what code names
    after it is torch's: ``repr(opt)``, Lightning's ``LearningRateMonitor`` metrics
    (``lr-Adam``, they were ``lr-RemoteOptimizer``), a worker's too (the session's class);
    the optimizer is still a ``RemoteOptimizer``."""
    local = getattr(torch.optim, optimizer)(mlp().parameters(), lr=0.1)
    remote = optserve.RemoteOptimizer(mlp().named_parameters(), optimizer, client, lr=0.1)
    worker = optserve.RemoteOptimizer(mlp().named_parameters(), client=client,
                                      session_id=remote.session_id, worker="w1")
    for opt in (remote, worker):
        assert isinstance(opt, optserve.RemoteOptimizer)
        assert type(opt).__name__ == optimizer
        assert repr(opt).replace("    param_names: ['0.weight', '0.bias', '2.weight', "
                                 "'2.bias']\n", "") == repr(local)
    assert type(remote) is type(worker)
    remote.close(delete_session=True)


def test_a_lazy_modules_uninitialized_parameters_are_refused_saying_what_to_do(
        client: optserve.Client) -> None:
    """``nn.LazyLinear``'s parameters before its first forward (torch's optimizer takes them,
    its state made at the first step): a ``ValueError`` saying to run a forward pass first, at
    construction or ``add_param_group``, before any session or group is made; after a dummy
    forward the optimizer trains as torch's."""
    sessions = len(client.list_sessions())
    with pytest.raises(ValueError, match="forward pass"):
        optserve.RemoteOptimizer(nn.LazyLinear(4).parameters(), "Adam", client, lr=0.1)
    remote = optserve.RemoteOptimizer(mlp().parameters(), "Adam", client, lr=0.1)
    with pytest.raises(ValueError, match="forward pass"):
        remote.add_param_group({"params": nn.LazyLinear(4).parameters()})
    assert len(remote.param_groups) == 1
    assert len(client.list_sessions()) == sessions + 1
    remote.close(delete_session=True)
    def lazy() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.Linear(16, 4))
        model(torch.zeros(1, 8))  # the dummy batch
        return model
    local_model, remote_model = lazy(), lazy()
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=1e-2)
    for model, opt in ((local_model, local), (remote_model, remote)):
        train(model, opt, range(2))
    for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(p, q)
    remote.close(delete_session=True)
