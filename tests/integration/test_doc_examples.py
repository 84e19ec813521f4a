"""The documentation's runnable examples, run as written against a live server, their results
compared with in-process torch and with what the text says they print: the README's curl
quickstart and row-sparse example (through bash and curl), the JavaScript client's README
example (through node), the Python SDK README's client example and the parameter-server example
(``python -m examples.parameter_server``). (The README's Python quickstart has its own module,
test_readme.py; the curl scripts of clients/curl run under scripts/test-clients; the docs'
fragments, code that takes names from its surroundings, run in test_doc_fragments.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOC_URL = "http://127.0.0.1:8000"


def block(path: Path, heading: str, lang: str) -> str:
    """The first ``lang`` code block after ``heading`` in ``path``."""
    text = path.read_text()
    match = re.search(rf"```{lang}\n(.*?)```", text[text.index(heading):], re.S)
    assert match, f"no {lang} block after {heading!r} in {path.name}"
    return match.group(1)


def json_values(text: str) -> list[Any]:
    """The JSON values written one after another in ``text`` (curl -s prints no newlines)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)
    return values


def without_time(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "metrics": {k: v for k, v in answer["metrics"].items() if k != "time"}}


def seed_session_in_torch() -> tuple[torch.nn.Parameter, torch.optim.SGD, Any]:
    """The README's seed example in process: SGD(lr 0.1, momentum 0.9) + StepLR(10, 0.1)."""
    x = torch.nn.Parameter(torch.tensor([2.0]))
    opt = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    return x, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)


def f32(data: list[float]) -> torch.Tensor:
    """A float32 tensor of values as JSON carries them (the shortest text that reads back)."""
    return torch.tensor(data, dtype=torch.float32)


def torch_step(x: torch.nn.Parameter, opt: torch.optim.SGD, sched: Any) -> None:
    x.grad = 8 * x.detach().clone()  # f(x) = 4x², as the README's client computes it
    opt.step()
    sched.step()


def test_readme_curl_quickstart_runs_as_written(live_server: str, tmp_path: Path) -> None:
    readme = ROOT / "README.md"
    code = block(readme, "## Quickstart with curl", "bash")
    assert code.count(f"B={DOC_URL}\n") == 1
    sid = f"seed-{uuid.uuid4().hex[:8]}"  # the live server is shared: an id of its own
    script = code.replace(f"B={DOC_URL}", f"B={live_server}").replace("seed", sid)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    created, stepped, imported = json_values(run.stdout)

    x, opt, sched = seed_session_in_torch()
    x0 = x.detach().clone()
    torch_step(x, opt, sched)
    assert created["id"] == sid and (created["version"], created["lr"]) == (0, [0.1])
    # the step's answer is the one the README prints under it (but for its time) ...
    printed = "".join(line.removeprefix("# ").removeprefix("#  ")
                      for line in code.splitlines() if line.startswith(("# {", "#  ")))
    assert without_time(stepped) == without_time(json.loads(printed))
    # ... and torch's: the new x, and the norms of the update and the parameter
    assert torch.equal(f32(stepped["params"]["x"]["data"]), x.detach())
    group = stepped["metrics"]["groups"][0]
    update = torch.linalg.vector_norm(x.detach() - x0).item()
    param = torch.linalg.vector_norm(x.detach()).item()
    assert (group["grad_norm"], group["update_norm"], group["param_norm"]) == (16.0, update,
                                                                              param)
    assert group["update_ratio"] == update / param
    assert imported["version"] == 2 and imported["step"] == 1  # the import is a version

    # the two files it saved: the JSON state, and a torch.save file torch's SGD loads
    saved = json.loads((tmp_path / f"{sid}-state.json").read_text())
    assert torch.equal(f32(saved["state"]["0"]["momentum_buffer"]["data"]),
                       opt.state[x]["momentum_buffer"])
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.tensor([2.0]))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(torch.load(tmp_path / f"{sid}-state.pt", weights_only=True))
    assert torch.equal(next(iter(fresh.state.values()))["momentum_buffer"],
                       opt.state[x]["momentum_buffer"])

    # "After 10 steps of the session above, `lr` is `[0.010000000000000002]`"
    stated = re.search(r"After 10 steps of the session above, `lr` is `(\[[^`]*\])`",
                       readme.read_text())
    assert stated, "the README no longer states the lr after 10 steps"
    with httpx.Client(base_url=live_server) as http:
        for _ in range(9):
            r = http.post(f"/v1/sessions/{sid}/step",
                          json={"grads": {"x": {"dtype": "float32", "shape": [1],
                                                "data": [8 * x.item()]}}})
            assert r.status_code == 200, r.text
            torch_step(x, opt, sched)
            assert torch.equal(f32(r.json()["params"]["x"]["data"]), x.detach())
        assert r.json()["step"] == 10
        assert r.json()["lr"] == sched.get_last_lr() == json.loads(stated.group(1))
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_js_readme_example_runs_as_written(live_server: str, tmp_path: Path) -> None:
    code = block(ROOT / "clients" / "js" / "README.md", "# optserve JavaScript client", "js")
    module = (ROOT / "clients" / "js" / "optserve.js").as_uri()
    assert code.count('from "./optserve.js"') == 1 and code.count(f'"{DOC_URL}"') == 1
    script = (code.replace('"./optserve.js"', json.dumps(module))
              .replace(f'"{DOC_URL}"', json.dumps(live_server))
              + "const info = await c.getSession(s.id);\n"
              "console.log(JSON.stringify({x: Array.from(x.data), lr: info.lr, "
              "version: info.version, step: info.step}));\n"
              "await c.deleteSession(s.id);\n")
    (tmp_path / "example.mjs").write_text(script)
    run = subprocess.run(["node", str(tmp_path / "example.mjs")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])

    x, opt, sched = seed_session_in_torch()
    for _ in range(10):
        torch_step(x, opt, sched)
    assert got == {"x": x.detach().tolist(), "lr": sched.get_last_lr(), "version": 10,
                   "step": 10}


def test_sdk_readme_client_example_prints_what_it_says(live_server: str) -> None:
    code = block(ROOT / "clients" / "python" / "README.md", "## The client", "python")
    assert code.count(f'"{DOC_URL}"') == 1
    comment = re.search(r"print\(.*\)\s+# (.*)\n", code)
    assert comment, "the example no longer says what it prints"
    namespace: dict[str, Any] = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(DOC_URL, live_server), "clients/python/README.md", "exec"),
             namespace)
    assert out.getvalue().strip() == comment.group(1).strip()

    # and torch's own SGD at lr 1 from x = 2 with the gradient 16 gives that x
    x = torch.nn.Parameter(torch.tensor([2.0]))
    x.grad = torch.tensor([16.0])
    torch.optim.SGD([x], lr=1).step()
    assert namespace["r"].params["x"].tolist() == x.detach().tolist()
    with httpx.Client(base_url=live_server) as http:
        assert http.delete(f"/v1/sessions/{namespace['s'].id}").status_code == 204


def test_parameter_server_example_runs_and_trains_as_full_batch_adam(live_server: str) -> None:
    """README and docs/parameter-server.md: ``python -m examples.parameter_server`` (here its
    sync half, against the live server, 20 rounds). A round's mean of the four equal shards'
    mean-loss gradients is the full batch's, so the losses it prints are those of full-batch
    Adam in process (to their four decimals and float rounding: the tests of the reduction
    itself check 1e-6)."""
    from examples.parameter_server.train import make_model, spirals

    rounds = 20
    run = subprocess.run(
        [sys.executable, "-m", "examples.parameter_server", "--url", live_server,
         "--mode", "sync", "--rounds", str(rounds)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "clients" / "python"), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stdout + run.stderr
    first = re.search(r"\[sync\] round   1: mean worker loss ([0-9.]+) \(session version 1\)",
                      run.stdout)
    late = re.search(rf"\[sync\] late joiner pulled version {rounds}: full-set loss ([0-9.]+), "
                     r"accuracy ([0-9.]+)%", run.stdout)
    assert first and late, run.stdout

    x, y = spirals()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(rounds):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    assert abs(float(first.group(1)) - losses[0]) <= 6e-5, (first.group(1), losses[0])
    assert abs(float(late.group(1)) - final) <= 6e-5, (late.group(1), final)
    assert final < losses[0]


def test_readme_embedding_curl_example_runs_as_written(live_server: str, tmp_path: Path) -> None:
    """The README's row-sparse example: it makes its table (a new user has no ``emb``
    session), pushes a gradient of rows 3, 17, 3 and pulls rows 3 and 17: the touched rows
    answered and pulled are torch's SparseAdam's on the same sparse gradient."""
    code = block(ROOT / "README.md", "## Embedding tables", "bash")
    sid = f"emb-{uuid.uuid4().hex[:8]}"  # the live server is shared: an id of its own
    assert code.count('"id": "emb"') == 1 and code.count("sessions/emb/") == 2
    script = (f"B={live_server}\n" + code.replace('"id": "emb"', f'"id": "{sid}"')
              .replace("sessions/emb/", f"sessions/{sid}/"))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    created, stepped, pulled = json_values(run.stdout)
    assert created["id"] == sid and created["optimizer"] == "SparseAdam", created
    table = torch.nn.Parameter(torch.zeros(20, 2))
    opt = torch.optim.SparseAdam([table], lr=0.01)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[3, 17, 3]]),
                                         torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                                         (20, 2), check_invariants=True)
    opt.step()
    want = table.detach()[[3, 17]]
    for answer in (stepped, pulled):
        rows = answer["params"]["emb"]
        assert rows["indices"] == [3, 17] and rows["shape"] == [20, 2], answer
        assert torch.equal(f32(rows["values"]["data"]).reshape(2, 2), want), answer
    assert (stepped["version"], pulled["version"]) == (1, 1)
    assert httpx.delete(f"{live_server}/v1/sessions/{sid}").status_code == 204


def test_js_readme_names_every_option_each_call_takes() -> None:
    """clients/js/README.md says a call's options take "the names the table gives it and no
    other": each option ``optserve.js`` takes (its ``optionsOf`` list) is in the call's row of
    that table, and the table names none the call refuses (``idempotencyKey``, which every
    mutating call takes, is stated once under the table)."""
    source = (ROOT / "clients" / "js" / "optserve.js").read_text()
    readme = (ROOT / "clients" / "js" / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    checked = 0
    for names, call in re.findall(r'optionsOf\(callOptions, \[([^\]]*)\], "(\w+)"\)', source):
        takes = set(re.findall(r'"(\w+)"', names)) - {"idempotencyKey"}
        rows = [m for line in table for m in re.findall(rf"`{call}\(([^`]*)\)`", line)]
        if not rows:
            continue  # (not a method of the table: the constructor, codec helpers)
        documented: set[str] = set()
        for args in rows:
            last = re.search(r"\{([^{}]*)\}\)?$", args)
            if last and not last.group(1).startswith(("loss", "emb")):
                documented |= {a.strip().split(":")[0] for a in last.group(1).split(",")}
        assert takes == documented - {""}, (call, sorted(takes), sorted(documented))
        checked += 1
    assert checked >= 15, checked
