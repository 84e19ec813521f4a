"""A wrapper that keeps its own per-parameter state and param-group keys in the optimizer it
wraps (timm's ``Lookahead``: ``lookahead_slow_buff`` in ``base.state[p]``, ``lookahead_alpha``,
``lookahead_k`` and ``lookahead_step`` in each group) around ``RemoteOptimizer``, compared bit
for bit with the same wrapper around the local ``torch.optim.Adam``: parameters and the whole
state dict at every step, checkpoints between the two, and what reaches the server (never the
wrapper's keys)."""

from __future__ import annotations

import io
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import Optimizer

import optserve

pytestmark = pytest.mark.integration


class Lookahead(Optimizer):
    """timm 1.0.31's ``timm.optim.lookahead.Lookahead`` (Apache-2.0, Ross Wightman), copied as
    it is (timm is not a dependency of this project); only its annotations are added."""

    def __init__(self, base_optimizer: Optimizer, alpha: float = 0.5, k: int = 6) -> None:
        # NOTE super().__init__() not called on purpose
        self._optimizer_step_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'Invalid slow update rate: {alpha}')
        if not 1 <= k:
            raise ValueError(f'Invalid lookahead steps: {k}')
        defaults = dict(lookahead_alpha=alpha, lookahead_k=k, lookahead_step=0)
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.defaults.update(defaults)
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        # manually add our defaults to the param groups
        for name, default in defaults.items():
            for group in self._base_optimizer.param_groups:
                group.setdefault(name, default)

    @property
    def is_second_order(self) -> bool:
        return getattr(self._base_optimizer, 'is_second_order', False)

    @torch.no_grad()
    def update_slow(self, group: dict[str, Any]) -> None:
        for fast_p in group["params"]:
            if fast_p.grad is None:
                continue
            param_state = self._base_optimizer.state[fast_p]
            if 'lookahead_slow_buff' not in param_state:
                param_state['lookahead_slow_buff'] = torch.empty_like(fast_p)
                param_state['lookahead_slow_buff'].copy_(fast_p)
            slow = param_state['lookahead_slow_buff']
            slow.add_(fast_p - slow, alpha=group['lookahead_alpha'])
            fast_p.copy_(slow)

    def sync_lookahead(self) -> None:
        for group in self._base_optimizer.param_groups:
            self.update_slow(group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self._base_optimizer.step(closure)
        for group in self._base_optimizer.param_groups:
            group['lookahead_step'] += 1
            if group['lookahead_step'] % group['lookahead_k'] == 0:
                self.update_slow(group)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_optimizer.load_state_dict(state_dict)
        self.param_groups = self._base_optimizer.param_groups
        # state_dict may be from a base optimizer w/o lookahead, ensure lookahead group keys
        # are present
        for name in ('lookahead_alpha', 'lookahead_k', 'lookahead_step'):
            for group in self.param_groups:
                group.setdefault(name, self.defaults[name])


@pytest.fixture
def logged(live_server: str) -> Iterator[tuple[optserve.Client, list[bytes]]]:
    """A client over HTTP and the bodies of every request it sent."""
    bodies: list[bytes] = []

    def hook(request: httpx.Request) -> None:
        bodies.append(request.read())

    with httpx.Client(event_hooks={"request": [hook]}) as http, \
            optserve.Client(live_server, http_client=http, transport="http",
                            max_retries=0) as client:
        yield client, bodies


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model: nn.Module, opt: Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(40 + i)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def local_lookahead(model: nn.Module, k: int) -> Lookahead:
    return Lookahead(torch.optim.Adam(model.parameters(), lr=0.05), alpha=0.5, k=k)


def remote_lookahead(model: nn.Module, client: optserve.Client, k: int,
                     detect_data_edits: bool = True) -> Lookahead:
    return Lookahead(optserve.RemoteOptimizer(model.parameters(), "Adam", client, lr=0.05,
                                              detect_data_edits=detect_data_edits),
                     alpha=0.5, k=k)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def assert_same_state_dict(want: dict[str, Any], got: dict[str, Any]) -> None:
    """Equal state dicts: the same groups (every key), the same entries with the same keys,
    every tensor equal bit for bit (and of the same dtype)."""
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])
    for pid, entry in want["state"].items():
        assert set(got["state"][pid]) == set(entry), pid
        for key, value in entry.items():
            other = got["state"][pid][key]
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype, (pid, key)
            assert torch.equal(other, value), (pid, key)


def saved(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict as a checkpoint file brings it back (``torch.save``, ``torch.load``)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("detect_data_edits", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_lookahead_over_remote_adam_steps_as_over_local_adam(client: optserve.Client, k: int,
                                                              detect_data_edits: bool) -> None:
    """Each step: the same parameters and the same whole state dict (Adam's state with each
    parameter's ``lookahead_slow_buff``, the groups with their ``lookahead_*`` keys); the slow
    buffer is the one tensor the wrapper made, kept across the remote optimizer's steps as a
    local optimizer's ``state`` keeps it. The wrapper's ``fast_p.copy_(slow)`` after a step
    reaches the session before the next (by the version counter, with or without
    ``detect_data_edits``)."""
    local_model, remote_model = mlp(), mlp()
    local = local_lookahead(local_model, k)
    remote = remote_lookahead(remote_model, client, k, detect_data_edits)
    base = remote._base_optimizer
    assert isinstance(base, optserve.RemoteOptimizer)
    first = next(remote_model.parameters())
    made: torch.Tensor | None = None
    try:
        for i in range(3 * k + 1):
            train(local_model, local, i)
            train(remote_model, remote, i)
            assert_same_params(local_model, remote_model)
            assert_same_state_dict(local.state_dict(), remote.state_dict())
            if i + 1 >= k:
                buffer = base.state[first]["lookahead_slow_buff"]
                made = buffer if made is None else made
                assert buffer is made
            assert remote.param_groups[0]["lookahead_step"] == i + 1
    finally:
        base.close(delete_session=True)


@pytest.mark.parametrize("saver, loader", [("remote", "remote"), ("local", "remote"),
                                           ("remote", "local")])
def test_a_lookahead_checkpoint_goes_on_bitwise(client: optserve.Client, saver: str,
                                                loader: str) -> None:
    """A checkpoint (the model's and the wrapper's state dicts through ``torch.save``) taken
    from one side after its slow buffers exist and loaded into a fresh model and wrapper on
    the other goes on bit for bit as the uninterrupted local run."""
    k = 2
    whole_model = mlp()
    whole = local_lookahead(whole_model, k)
    first_model = mlp()
    first = (local_lookahead(first_model, k) if saver == "local"
             else remote_lookahead(first_model, client, k))
    second_model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    second = (local_lookahead(second_model, k) if loader == "local"
              else remote_lookahead(second_model, client, k))
    try:
        for i in range(3):
            train(whole_model, whole, i)
            train(first_model, first, i)
        checkpoint = saved({"model": first_model.state_dict(), "opt": first.state_dict()})
        second_model.load_state_dict(checkpoint["model"])
        second.load_state_dict(checkpoint["opt"])
        assert_same_state_dict(whole.state_dict(), second.state_dict())
        for i in range(3, 3 + 2 * k + 1):
            train(whole_model, whole, i)
            train(second_model, second, i)
            assert_same_params(whole_model, second_model)
            assert_same_state_dict(whole.state_dict(), second.state_dict())
    finally:
        for opt in (first, second):
            base = opt._base_optimizer
            if isinstance(base, optserve.RemoteOptimizer):
                base.close(delete_session=True)


def test_the_wrappers_keys_never_reach_the_server(logged: tuple[optserve.Client, list[bytes]]
                                                  ) -> None:
    """Neither the slow buffers nor the ``lookahead_*`` group keys (nor a group key of the
    user's own) are in any request's body, and the session holds none of them; they are in
    the optimizer's state dict, and a state dict holding them loads."""
    client, bodies = logged
    model = mlp()
    opt = remote_lookahead(model, client, 2)
    base = opt._base_optimizer
    assert isinstance(base, optserve.RemoteOptimizer)
    base.param_groups[0]["group_tag"] = "trunk"
    try:
        for i in range(5):
            train(model, opt, i)
        sd = opt.state_dict()
        assert all("lookahead_slow_buff" in entry for entry in sd["state"].values())
        assert sd["param_groups"][0]["group_tag"] == "trunk"
        opt.load_state_dict(saved(sd))
        train(model, opt, 5)
        session = client.export_state(base.session_id)
        assert all(set(entry) == {"step", "exp_avg", "exp_avg_sq"}
                   for entry in session["state"].values())
        assert not any(k.startswith("lookahead") or k == "group_tag"
                       for k in session["param_groups"][0])
        assert bodies and not any(b"lookahead" in body or b"group_tag" in body
                                  for body in bodies)
        assert base.param_groups[0]["group_tag"] == "trunk"
        assert base.param_groups[0]["lookahead_step"] == 6
    finally:
        base.close(delete_session=True)



def test_a_group_key_a_wrapper_adds_survives_steps_and_checkpoints(client: optserve.Client
                                                                   ) -> None:
    """Extra group keys stay in ``param_groups`` through steps, ``state_dict()`` and a
    ``load_state_dict()`` into another remote optimizer, as in a local one; a group added
    with one (a key the wrapper put in ``defaults`` too, as ``Lookahead`` does) is added, the
    key kept locally; an option the server knows, edited locally, still goes with the next
    step."""
    local_model, remote_model = mlp(), mlp()
    local_extra = nn.Parameter(torch.linspace(-1, 1, 3))
    remote_extra = nn.Parameter(torch.linspace(-1, 1, 3))
    local = torch.optim.Adam(local_model.parameters(), lr=0.05)
    remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=0.05)
    other_model = mlp()
    other = optserve.RemoteOptimizer(other_model.parameters(), "Adam", client, lr=0.05)
    other.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    try:
        for opt, extra in ((local, local_extra), (remote, remote_extra)):
            opt.defaults.update(lookahead_k=3)
            opt.param_groups[0]["lookahead_k"] = 3
            opt.param_groups[0]["lr"] = 0.02
            opt.add_param_group({"params": [extra], "lookahead_k": 5, "lr": 0.1})
        for i in range(2):
            for model, opt, extra in ((local_model, local, local_extra),
                                      (remote_model, remote, remote_extra)):
                opt.zero_grad()
                g = torch.Generator().manual_seed(40 + i)
                x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
                (F.mse_loss(model(x), y) + (extra * x[0, :3]).sum()).backward()
                opt.step()
        assert_same_params(local_model, remote_model)
        assert torch.equal(local_extra, remote_extra)
        assert [g["lookahead_k"] for g in remote.param_groups] == [3, 5]
        assert_same_state_dict(local.state_dict(), remote.state_dict())
        other.load_state_dict(saved(remote.state_dict()))
        assert [g["lookahead_k"] for g in other.param_groups] == [3, 5]
        assert_same_state_dict(local.state_dict(), other.state_dict())
    finally:
        for opt in (remote, other):
            opt.close(delete_session=True)


def test_a_state_assigned_with_a_wrappers_keys_keeps_them_here(
        logged: tuple[optserve.Client, list[bytes]]) -> None:
    """``opt.state = mapping`` whose entries hold a wrapper's keys beside Adam's: the
    session takes Adam's, the wrapper's stay here (the same tensors), and training goes on
    as a local optimizer whose state was assigned the same mapping."""
    client, bodies = logged
    local_model, remote_model = mlp(), mlp()
    local = local_lookahead(local_model, 2)
    remote = remote_lookahead(remote_model, client, 2)
    base = remote._base_optimizer
    assert isinstance(base, optserve.RemoteOptimizer)
    try:
        for i in range(3):
            train(local_model, local, i)
            train(remote_model, remote, i)
        local_base = local._base_optimizer
        assigned = {q: {k: v.clone() for k, v in local_base.state[p].items()}
                    for p, q in zip(local_model.parameters(), remote_model.parameters(),
                                    strict=True)}
        local_base.state = defaultdict(dict, {p: {k: v.clone() for k, v in entry.items()}
                                              for p, entry in zip(local_model.parameters(),
                                                                  assigned.values(),
                                                                  strict=True)})
        base.state = assigned
        first = next(remote_model.parameters())
        assert base.state[first]["lookahead_slow_buff"] is \
            assigned[first]["lookahead_slow_buff"]
        for i in range(3, 8):
            train(local_model, local, i)
            train(remote_model, remote, i)
            assert_same_params(local_model, remote_model)
            assert_same_state_dict(local.state_dict(), remote.state_dict())
        assert not any(b"lookahead" in body for body in bodies)
    finally:
        base.close(delete_session=True)


def test_another_optimizers_state_is_still_refused(client: optserve.Client) -> None:
    """A key another optimizer of torch's keeps is that optimizer's state, not a wrapper's:
    an SGD-with-momentum checkpoint loaded into a remote Adam goes to the server, which refuses
    it (422 ``state_mismatch``) as before the wrappers' keys were kept here (torch's next Adam
    step would fail on it), the session and the client-side state unchanged; a wrapper's key
    beside it changes nothing of that."""
    sgd_model, model = mlp(), mlp()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9)
    train(sgd_model, sgd, 0)
    checkpoint = saved(sgd.state_dict())
    local_model = mlp()
    local = local_lookahead(local_model, 2)
    remote = remote_lookahead(model, client, 2)
    for i in range(3):
        train(local_model, local, i)
        train(model, remote, i)
    before = remote.state_dict()
    version = client.get_session(remote._base_optimizer.session_id).version
    for extra in ({}, {"lookahead_slow_buff": torch.zeros(1)}):
        # (Adam's groups, SGD's entries: the same model, so the same param ids)
        bad = {"param_groups": before["param_groups"],
               "state": {pid: {**entry, **extra} for pid, entry in checkpoint["state"].items()}}
        with pytest.raises(optserve.ValidationError) as refused:
            remote.load_state_dict(bad)
        assert refused.value.code == "state_mismatch", refused.value
        assert "momentum_buffer" in str(refused.value)
        assert client.get_session(remote._base_optimizer.session_id).version == version
        assert_same_state_dict(local.state_dict(), remote.state_dict())
    for i in range(3, 5):  # and it goes on as the local run
        train(local_model, local, i)
        train(model, remote, i)
        assert_same_params(local_model, model)
    assert_same_state_dict(local.state_dict(), remote.state_dict())
