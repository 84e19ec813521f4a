"""``RemoteOptimizer`` sends parameters edited through ``p.data`` before the next step, as it
does those edited in place (``optserve._edits``): WGAN weight clipping
(``p.data.clamp_(-c, c)`` after every step), ``p.data.copy_(...)``, ``p.data = tensor`` and
``torch.nn.utils.vector_to_parameters`` train bit for bit as a local torch optimizer, over
HTTP (safetensors and JSON) and over the same-host transport with and without ``zero_copy``
(where the parameter's memory is its slot in the shared segment), and for a
parameter-server worker. ``detect_data_edits=False`` keeps the old behaviour: the server steps
from its own values, as if the edit had not been made."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import LiveServer, _test_settings
from torch import nn

import optserve

pytestmark = pytest.mark.integration

Edit = Callable[[nn.Module, int], None]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    live = LiveServer(_test_settings(durability="memory"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


# how each test's RemoteOptimizer reaches the server: (Client transport, binary, zero_copy)
WAYS = {
    "http-binary": ("http", True, True),
    "http-json": ("http", False, True),
    "local-zero-copy": ("local", True, True),
    "local-copy": ("local", True, False),
}


def critic(seed: int, hidden: int = 16) -> tuple[nn.Module, nn.Module]:
    """A small critic; ``hidden=4096``: one weight of 24,576 values (compared on its own, not
    joined with the small ones) and answers over 256 KB (read into the kept buffer)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    return model, copy.deepcopy(model)


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + k)
    return torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g) * 0.5 + 1.0


def critic_step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    """One WGAN critic step: maximize D(real) - D(fake)."""
    real, fake = batch(k)
    opt.zero_grad()
    (model(fake).mean() - model(real).mean()).backward()
    opt.step()


def clamp(model: nn.Module, k: int) -> None:
    """WGAN's weight clipping, as its reference code writes it."""
    for p in model.parameters():
        p.data.clamp_(-0.01, 0.01)


def copy_into(model: nn.Module, k: int) -> None:
    g = torch.Generator().manual_seed(900 + k)
    w = model[0].weight
    w.data.copy_(w.detach() * 0.5 + torch.randn(w.shape, generator=g) * 0.1)


def replace(model: nn.Module, k: int) -> None:
    g = torch.Generator().manual_seed(700 + k)
    b = model[2].weight
    b.data = b.data * 0.5 + torch.randn(b.shape, generator=g) * 0.01


def from_vector(model: nn.Module, k: int) -> None:
    vec = nn.utils.parameters_to_vector(model.parameters()).detach()
    nn.utils.vector_to_parameters(vec * 0.9 - 0.001 * k, model.parameters())


EDITS: dict[str, Edit] = {"clamp": clamp, "copy_": copy_into, "replace": replace,
                          "vector_to_parameters": from_vector}

OPTIMIZERS = {"RMSprop": {"lr": 5e-3}, "Adam": {"lr": 1e-2, "betas": (0.5, 0.9)}}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(bits(p), bits(q)), name


def run(server: str, way: str, optimizer: str, edit: Edit, steps: int = 5,
        detect: bool | None = None, hidden: int = 16
        ) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """The same loop (a step, then the edit through .data) with a local torch optimizer and a
    RemoteOptimizer; returns both models and the session's parameters at the end."""
    transport, binary, zero_copy = WAYS[way]
    options = OPTIMIZERS[optimizer]
    local_model, remote_model = critic(3, hidden)
    local = getattr(torch.optim, optimizer)(local_model.parameters(), **options)
    extra = {} if detect is None else {"detect_data_edits": detect}
    with optserve.Client(server, transport=transport, max_retries=0) as c:
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), optimizer, c,
                                          binary=binary, zero_copy=zero_copy, **extra,
                                          **options)
        try:
            for k in range(steps):
                for model, opt in ((local_model, local), (remote_model, remote)):
                    critic_step(model, opt, k)
                    edit(model, k)
            pulled = c.get_params(remote.session_id).params
        finally:
            remote.close(delete_session=True)
    return local_model, remote_model, pulled


def spy_on_puts(c: optserve.Client) -> list[list[str]]:
    """The names of the parameters each ``put_params`` of ``c`` sends, in order, from now on."""
    sent: list[list[str]] = []
    put = c.put_params

    def spy(id: str, params: dict[str, torch.Tensor], **kw: object) -> optserve.ParamsResult:
        sent.append(sorted(params))
        return put(id, params, **kw)  # type: ignore[arg-type]

    c.put_params = spy  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize("hidden", [16, 4096])
@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_wgan_weight_clipping_through_data_trains_as_torch(server: str, way: str,
                                                           optimizer: str, hidden: int) -> None:
    local_model, remote_model, pulled = run(server, way, optimizer, clamp, steps=6,
                                            hidden=hidden)
    assert_bitwise(local_model, remote_model)
    # the clipping of the last step is sent with the next one: the session holds the values
    # the last step gave, which the local ones are clamped from
    for (name, p), q in zip(remote_model.named_parameters(), pulled.values(), strict=True):
        assert torch.equal(bits(p), bits(q.clamp(-0.01, 0.01))), name


@pytest.mark.parametrize("hidden", [16, 4096])
@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("edit", ["copy_", "replace", "vector_to_parameters"])
def test_other_edits_through_data_train_as_torch(server: str, way: str, edit: str,
                                                 hidden: int) -> None:
    local_model, remote_model, _ = run(server, way, "Adam", EDITS[edit], steps=4,
                                       hidden=hidden)
    assert_bitwise(local_model, remote_model)


@pytest.mark.parametrize("way", list(WAYS))
def test_only_the_edited_parameters_are_sent(server: str, way: str) -> None:
    """One parameter edited through .data (to values of its own), one replaced by a tensor of
    the same values, two untouched: only the first is sent (one PUT of it)."""
    transport, binary, zero_copy = WAYS[way]
    local_model, remote_model = critic(4)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    with optserve.Client(server, transport=transport, max_retries=0) as c:
        sent = spy_on_puts(c)
        remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", c,
                                          binary=binary, zero_copy=zero_copy, lr=1e-2)
        try:
            for k in range(3):
                for model, opt in ((local_model, local), (remote_model, remote)):
                    critic_step(model, opt, k)
                    model[0].bias.data.mul_(0.5)
                    model[2].weight.data = model[2].weight.data.clone()
            assert_bitwise(local_model, remote_model)
        finally:
            remote.close(delete_session=True)
    assert sent == [["0.bias"], ["0.bias"]]  # before the second and third steps


@pytest.mark.parametrize("way", list(WAYS))
def test_without_detection_the_server_steps_from_its_own_values(server: str,
                                                                 way: str) -> None:
    """``detect_data_edits=False``: edits through .data are not sent, so the session steps
    its own unclipped values with the gradients the clipped ones gave (what an old optimizer
    did), and each step's answer overwrites the clipping: a local run doing exactly that."""
    own, _ = critic(3)
    opt = torch.optim.RMSprop(own.parameters(), **OPTIMIZERS["RMSprop"])
    for k in range(4):
        unclipped = [p.detach().clone() for p in own.parameters()]
        if k:  # the gradient is taken at the values the model holds: clipped after a step
            clamp(own, k)
        real, fake = batch(k)
        opt.zero_grad()
        (own(fake).mean() - own(real).mean()).backward()
        for p, u in zip(own.parameters(), unclipped, strict=True):
            p.data.copy_(u)
        opt.step()
    _, remote_model, pulled = run(server, way, "RMSprop", clamp, steps=4, detect=False)
    for (name, p), q in zip(own.named_parameters(), pulled.values(), strict=True):
        assert torch.equal(bits(p), bits(q)), name
    for (name, p), q in zip(own.named_parameters(), remote_model.parameters(), strict=True):
        assert torch.equal(bits(p.clamp(-0.01, 0.01)), bits(q)), name


def test_a_parameter_server_worker_sends_its_clipped_values(server: str) -> None:
    """A worker of an async session clips through .data after each step: its next push is
    preceded by the overwrite, as with an in-place edit, and it trains as torch."""
    local_model, remote_model = critic(5)
    local = torch.optim.RMSprop(local_model.parameters(), lr=5e-3)
    with optserve.Client(server, max_retries=0) as c:
        info = c.create_session("RMSprop", {n: p.detach() for n, p in
                                            remote_model.named_parameters()},
                                options={"lr": 5e-3}, max_staleness=2)
        try:
            worker = optserve.RemoteOptimizer(remote_model.named_parameters(), "RMSprop",
                                              session_id=info.id, client=c, worker="w0")
            for k in range(5):
                for model, opt in ((local_model, local), (remote_model, worker)):
                    critic_step(model, opt, k)
                    clamp(model, k)
            assert_bitwise(local_model, remote_model)
        finally:
            c.delete_session(info.id)


def test_a_negative_zero_written_through_data_is_sent(server: str) -> None:
    """Compared bit for bit: -0.0 where 0.0 was is an edit (a float compare would miss it),
    and SGD with a zero gradient keeps it -0.0 where it keeps 0.0 as 0.0."""
    with optserve.Client(server, transport="http", max_retries=0) as c:
        p = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))
        remote = optserve.RemoteOptimizer([p], "SGD", c, lr=0.5)
        try:
            p.data[0] = -0.0
            p.grad = torch.zeros(3)
            remote.step()
            got = c.get_params(remote.session_id).params["0"]
            assert torch.equal(bits(got), bits(torch.tensor([-0.0, 1.0, 2.0])))
            assert torch.equal(bits(p), bits(got))
        finally:
            remote.close(delete_session=True)


def test_edits_among_row_sparse_steps_are_sent_once_and_only_they(server: str) -> None:
    """An embedding stepped by rows (its answer holds only the touched rows, and leaves out the
    parameters without a gradient) beside dense ones, over HTTP with answers read into the kept
    buffer: edits through .data are sent (only the edited parameters, once each) and the run
    is torch's; a parameter the row-sparse answer left out is not sent unedited."""
    gen = torch.Generator().manual_seed(8)
    # ("idle" first: its values lead the whole answers, where the row-sparse ones are read)
    init = {"idle": torch.randn(160, 160, generator=gen),
            "emb": torch.randn(3000, 48, generator=gen),
            "lin": torch.randn(512, 512, generator=gen)}
    local = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    mine = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    local_opt = torch.optim.SGD(list(local.values()), lr=0.1)

    def grads(k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(80 + k)
        out = {"lin": torch.randn(512, 512, generator=g)}
        if k in (1, 2):  # row-sparse steps: the answer (1 MB: read into the kept buffer)
            # has the touched rows and "lin" only
            rows = torch.randint(0, 3000, (20,), generator=g)
            out["emb"] = torch.sparse_coo_tensor(rows[None], torch.randn(20, 48, generator=g),
                                                 (3000, 48), check_invariants=True)
        return out

    def edit(params: dict[str, nn.Parameter], k: int) -> None:
        if k == 1:
            params["emb"].data.clamp_(-0.5, 0.5)
        if k == 2:
            params["lin"].data = params["lin"].data.clone()  # the same values: not an edit
        if k == 3:
            params["idle"].data.mul_(0.5)

    with optserve.Client(server, transport="http", max_retries=0) as c:
        sent = spy_on_puts(c)
        remote = optserve.RemoteOptimizer(list(mine.items()), "SGD", c, lr=0.1)
        try:
            for k in range(5):
                for params, opt in ((local, local_opt), (mine, remote)):
                    opt.zero_grad(set_to_none=True)
                    for name, g in grads(k).items():
                        params[name].grad = g.clone()
                    opt.step()
                    edit(params, k)
            for name in init:
                assert torch.equal(bits(local[name]), bits(mine[name])), name
            pulled = c.get_params(remote.session_id).params
            for name in init:
                assert torch.equal(bits(pulled[name]), bits(mine[name])), name
        finally:
            remote.close(delete_session=True)
    # "idle", left out of the row-sparse answers, was sent only once edited
    assert sent == [["emb"], ["idle"]]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_lbfgs_steps_after_edits_through_data_are_torchs(server: str, binary: bool) -> None:
    """LBFGS (the server asks for the loss and gradients at each point its line search tries,
    the parameters set to that point here): values scaled through .data between its steps are
    sent before the next one, and the run is torch's."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)
    options = {"lr": 1, "max_iter": 5, "history_size": 4, "line_search_fn": "strong_wolfe"}
    local_model, remote_model = (nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
                                 for _ in range(2))
    remote_model.load_state_dict(local_model.state_dict())
    local = torch.optim.LBFGS(local_model.parameters(), **options)  # type: ignore[arg-type]
    with optserve.Client(server, transport="http", max_retries=0) as c:
        remote = optserve.RemoteOptimizer(remote_model.parameters(), "LBFGS", c,
                                          binary=binary, **options)
        try:
            for _ in range(3):
                for model, opt in ((local_model, local), (remote_model, remote)):
                    def closure(model: nn.Module = model,
                                opt: torch.optim.Optimizer = opt) -> torch.Tensor:
                        opt.zero_grad()
                        loss = nn.functional.mse_loss(model(x), y)
                        loss.backward()
                        return loss
                    opt.step(closure)  # type: ignore[no-untyped-call]
                    for p in model.parameters():
                        p.data.mul_(0.75)
            assert_bitwise(local_model, remote_model)
        finally:
            remote.close(delete_session=True)
