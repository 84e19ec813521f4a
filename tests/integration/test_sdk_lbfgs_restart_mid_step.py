"""``RemoteOptimizer`` LBFGS (and the JS client's ``lbfgsStep``) through a server restart in the
middle of a step's evaluations.

The restarted server holds no open step (nothing of it was applied: docs/protocol.md, "Other
evaluations of a step the restart interrupted are 404 ... open a new step"). The SDK's next
evaluation got that 404 ``evaluation_not_found`` and ``opt.step(closure)`` raised it: a training
loop that survives any other restart (the SDK retries every call across one) stopped here, and
the JS client's ``lbfgsStep`` threw it too. Now both open the step again from the session's
values: the model and the session equal torch's ``LBFGS`` step for step, bitwise (JS: equal to
the same steps run without a restart). Real ``python -m app``, ``kill -9``, durability
``step``."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import optserve
from tests.integration.test_durability import Proc
from tests.torch_reference import assert_tensors_equal

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data").start()
    try:
        yield p
    finally:
        p.stop()


def test_an_lbfgs_step_whose_server_restarts_between_evaluations_is_opened_again(
        server: Proc) -> None:
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(20, 3), torch.nn.Linear(20, 3)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 20), torch.randn(16, 3)
    options = {"lr": 0.5, "max_iter": 4, "history_size": 4}
    calls = [0]
    restart_at: list[int] = []

    def closure(m: torch.nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            calls[0] += 1
            if calls[0] in restart_at:  # at a point the line search tries: the step is open
                server.kill9()
                server.start()
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return run

    with optserve.Client(server.url, timeout=300, transport="http") as client:
        opt = optserve.RemoteOptimizer(model.parameters(), "LBFGS", client=client, **options)
        ref = torch.optim.LBFGS(twin.parameters(), **options)  # type: ignore[arg-type]
        for k in range(3):
            calls[0] = 0
            restart_at[:] = [2] if k == 1 else []
            opt.step(closure(model, opt))
            if k == 1:
                assert calls[0] > 2  # the restart came in the middle of the step
            ref.step(closure(twin, ref))
            got = {n: p.detach() for n, p in model.named_parameters()}
            want = {n: p.detach() for n, p in twin.named_parameters()}
            assert_tensors_equal(got, want, f"the model after step {k + 1}")
            held = client.get_params(opt.session_id).params
            assert_tensors_equal({n: torch.as_tensor(held[str(i)]) for i, n in
                                  enumerate(want)}, want, f"the session after step {k + 1}")
        assert client.get_session(opt.session_id).step == 3
        opt.close(delete_session=True)


#: three LBFGS steps of f(w) = sum((w - t)^2) through ``lbfgsStep``; with ``kill`` the server's
#: pid gets SIGKILL at the second evaluation of the second step, and the evaluation waits for the
#: restarted server (the test restarts it) before it answers. Prints the parameters at the end.
JS_STEPS = """
import { OptserveClient, Tensor } from "%(client)s";
const [url, pid, kill] = [process.argv[2], Number(process.argv[3]), process.argv[4] === "1"];
const c = new OptserveClient({ baseUrl: url, timeoutMs: 120000 });
const t = [1, 2, 3, 4, 5];
const f32 = (xs) => Tensor.from(xs, { dtype: "float32", shape: [xs.length] });
const s = await c.createSession({ optimizer: "LBFGS",
  options: { lr: 0.5, max_iter: 4, history_size: 3 }, params: { w: f32([0.5, -1, 2, 0.25, 3]) } });
let calls = 0, stepNo = 0;
const evaluate = async (params) => {
  calls += 1;
  if (kill && stepNo === 1 && calls === 2) {
    process.kill(pid, "SIGKILL");
    for (;;) {
      try { if ((await fetch(url + "/healthz")).ok) break; } catch {}
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const d = params.w.toArray().map((v, i) => v - t[i]);
  return { loss: d.reduce((a, v) => a + v * v, 0), grads: { w: f32(d.map((v) => 2 * v)) } };
};
for (stepNo = 0; stepNo < 3; stepNo++) {
  calls = 0;
  const end = await c.lbfgsStep(s.id, evaluate);
  if (kill && stepNo === 1 && calls <= 2) throw new Error("the restart did not cut the step");
}
const info = await c.getSession(s.id);
const got = await c.getParams(s.id);
console.log(JSON.stringify({ step: info.step, w: got.params.w.toArray() }));
"""


def test_the_js_clients_lbfgs_step_whose_server_restarts_between_evaluations(
        server: Proc, tmp_path: Path) -> None:
    script = tmp_path / "steps.mjs"
    script.write_text(JS_STEPS % {"client": REPO / "clients" / "js" / "optserve.js"})

    def run(kill: bool) -> dict[str, object]:
        assert server.proc is not None
        done = subprocess.run(["node", str(script), server.url, str(server.proc.pid),
                               "1" if kill else "0"], capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    plain = run(kill=False)
    assert server.proc is not None
    killed = server.proc

    def restart() -> None:
        killed.wait()
        server.start()
    restarter = threading.Thread(target=restart)
    restarter.start()
    cut = run(kill=True)
    restarter.join(timeout=240)
    assert server.proc is not killed  # the server did restart in the middle
    assert cut == plain and plain["step"] == 3
