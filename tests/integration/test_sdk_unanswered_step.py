"""``RemoteOptimizer.step()`` that got no answer (the client's retries spent on a timeout or a
broken connection: maybe applied, maybe not), retried by the user with the same gradients:
it goes with the same ``Idempotency-Key``, so the server applies it once either way (torch's
values after one step); a retry after a new backward is a step of its own (a fresh key), and
the parameters end as the server's, equal to torch's run of the steps the server applied.
Over HTTP and over the same-host transport."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import nn

import optserve

pytestmark = pytest.mark.integration


class Flaky(httpx.HTTPTransport):
    """HTTP with a switch: ``"lost"`` sends a step and loses its answer (a read timeout after
    the server answered), ``"unsent"`` fails the step before sending it; every step's key is
    kept in ``keys``."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None
        self.keys: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/step"):
            return super().handle_request(request)
        self.keys.append(request.headers["idempotency-key"])
        if self.mode == "unsent":
            raise httpx.ConnectError("simulated: never sent", request=request)
        response = super().handle_request(request)
        if self.mode == "lost":
            response.read()
            response.close()
            raise httpx.ReadTimeout("simulated: the answer never came", request=request)
        return response


class Setup:
    """A client over ``transport`` whose step answers can be lost, and its step keys."""

    def __init__(self, url: str, transport: str) -> None:
        self.http = Flaky()
        self.http_client = httpx.Client(transport=self.http)  # (the test closes it)
        self.client = optserve.Client(url, transport=transport, max_retries=0,
                                      http_client=self.http_client)
        self.mode: str | None = None
        self.keys: list[str] = []
        if transport == "http":
            return
        channel = self.client._local_channel()
        assert channel is not None, "the live server offers the same-host transport"
        real = channel._exchange

        def flaky(message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
            if message.get("op") != "step":
                return real(message)
            self.keys.append(str(message["idempotency_key"]))
            if self.mode == "unsent":
                raise ConnectionResetError("simulated: never sent")
            answer = real(message)
            if self.mode == "lost":
                raise ConnectionResetError("simulated: the answer never came")
            return answer
        channel._exchange = flaky  # type: ignore[method-assign]

    def set(self, mode: str | None) -> None:
        self.mode = self.http.mode = mode

    def step_keys(self) -> list[str]:
        return self.keys + self.http.keys


@pytest.fixture(params=["http", "auto"], ids=["http", "same-host"])
def setup(live_server: str, request: pytest.FixtureRequest) -> Iterator[Setup]:
    s = Setup(live_server, request.param)
    try:
        yield s
    finally:
        s.client.close()
        s.http_client.close()


def model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def backward(m: nn.Module, k: int) -> None:
    m(torch.randn(4, 6, generator=torch.Generator().manual_seed(k))).pow(2).sum().backward()


def torch_run(steps: int) -> tuple[nn.Linear, torch.optim.SGD]:
    """In-process torch.optim.SGD: the first ``steps`` of batches 1, 2, ..."""
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for k in range(1, steps + 1):
        opt.zero_grad()
        backward(m, k)
        opt.step()
    return m, opt


def assert_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x.detach(), y.detach()), name


@pytest.mark.parametrize("worker", [False, True], ids=["own-session", "worker"])
@pytest.mark.parametrize("mode", ["lost", "unsent"], ids=["applied", "not-applied"])
def test_the_users_retry_of_an_unanswered_step_is_applied_once(setup: Setup, mode: str,
                                                               worker: bool) -> None:
    m = model()
    if worker:  # a parameter-server worker (its steps carry base_version)
        sid = setup.client.create_session(
            "SGD", {n: p.detach() for n, p in m.named_parameters()},
            options={"lr": 0.1, "momentum": 0.9}).id
        opt = optserve.RemoteOptimizer(m.named_parameters(), client=setup.client,
                                       session_id=sid, worker="w1")
    else:
        opt = optserve.RemoteOptimizer(m.parameters(), "SGD", setup.client, lr=0.1,
                                       momentum=0.9)
    opt.zero_grad()
    backward(m, 1)
    setup.set(mode)
    with pytest.raises((optserve.OptserveError, OSError)):
        opt.step()
    setup.set(None)
    applied = setup.client.get_session(opt.session_id).step
    assert applied == (1 if mode == "lost" else 0)
    opt.step()  # the user's retry: the same gradients
    assert setup.client.get_session(opt.session_id).step == 1
    keys = setup.step_keys()
    assert len(keys) == 2 and keys[0] == keys[1]
    assert_equal(m, torch_run(1)[0])
    # and training goes on from there as torch's does
    opt.zero_grad()
    backward(m, 2)
    opt.step()
    assert setup.client.get_session(opt.session_id).step == 2
    assert len(set(setup.step_keys())) == 2
    assert_equal(m, torch_run(2)[0])


@pytest.mark.parametrize("change", ["backward", "zero_grad-backward", "lr"])
def test_a_step_after_an_unanswered_one_with_new_gradients_is_a_step_of_its_own(
        setup: Setup, change: str) -> None:
    m = model()
    opt = optserve.RemoteOptimizer(m.parameters(), "SGD", setup.client, lr=0.1, momentum=0.9)
    opt.zero_grad()
    backward(m, 1)
    setup.set("lost")
    with pytest.raises((optserve.OptserveError, OSError)):
        opt.step()
    setup.set(None)
    assert setup.client.get_session(opt.session_id).step == 1
    if change == "lr":  # the same gradients with another lr: another step
        opt.param_groups[0]["lr"] = 0.05
    else:  # new gradients (at the local values, which the lost answer did not update)
        if change == "zero_grad-backward":
            opt.zero_grad()
        backward(m, 2)  # (else accumulated into the same .grad tensors: their versions move)
    # torch's run of what the server applied: its first step, then this one's gradients
    ref, ref_opt = torch_run(1)
    ref_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    for p, q in zip(ref.parameters(), m.parameters(), strict=True):
        assert q.grad is not None
        p.grad = q.grad.clone()
    opt.step()
    ref_opt.step()
    keys = setup.step_keys()
    assert len(keys) == 2 and keys[0] != keys[1]
    # both applied (the unanswered one was): torch's two steps, the local values the server's
    assert setup.client.get_session(opt.session_id).step == 2
    assert_equal(m, ref)



@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
def test_an_unanswered_step_after_answered_ones_is_no_edit_through_data(
        setup: Setup, zero_copy: bool) -> None:
    """``detect_data_edits`` (the default) compares each parameter with the values last
    written into it, kept where the answer left them (the same-host slot, the kept answer
    buffer) or copied (``zero_copy``: the parameter is its slot). A step applied without its
    answer coming back has written the slots (the new values in a ``zero_copy`` parameter, or
    in the slot another one is compared with): that is no edit through ``.data`` to send
    before the user's retry, which goes with its key and is answered, applied once; an edit
    through ``.data`` after it is."""
    m = model()
    opt = optserve.RemoteOptimizer(m.parameters(), "SGD", setup.client, lr=0.1, momentum=0.9,
                                   zero_copy=zero_copy)
    opt.zero_grad()
    backward(m, 1)
    opt.step()
    opt.zero_grad()
    backward(m, 2)
    setup.set("lost")
    with pytest.raises((optserve.OptserveError, OSError)):
        opt.step()
    setup.set(None)
    opt.step()  # the user's retry: the same gradients
    keys = setup.step_keys()
    assert len(keys) == 3 and keys[1] == keys[2]
    assert setup.client.get_session(opt.session_id).step == 2
    ref, ref_opt = torch_run(2)
    assert_equal(m, ref)
    for net, o in ((m, opt), (ref, ref_opt)):
        net.weight.data.mul_(0.5)
        o.zero_grad()
        backward(net, 3)
        o.step()
    assert_equal(m, ref)


def test_a_same_host_step_without_an_answer_retried_over_http_is_answered(
        live_server: str) -> None:
    """The socket step got no answer, then the socket is gone (``"auto"`` steps over HTTP):
    the user's retry over HTTP is the same request (its norms asked in the history, as the
    socket's was), so the server answers it (not a 422 ``idempotency_key_reused``)."""
    s = Setup(live_server, "auto")
    try:
        m = model()
        opt = optserve.RemoteOptimizer(m.parameters(), "SGD", s.client, lr=0.1, momentum=0.9)
        backward(m, 1)
        s.set("lost")
        with pytest.raises(OSError):
            opt.step()
        s.set(None)
        s.client._thread.channel = None  # the same-host transport gone: HTTP from now on
        s.client._local_path, s.client._local_checked = None, True
        opt.step()
        keys = s.step_keys()
        assert len(keys) == 2 and keys[0] == keys[1] and len(s.http.keys) == 1
        assert s.client.get_session(opt.session_id).step == 1
        assert_equal(m, torch_run(1)[0])
    finally:
        s.client.close()
        s.http_client.close()
