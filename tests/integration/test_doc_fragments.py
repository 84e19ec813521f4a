"""The documentation's code fragments, run as written against a live server with only the
names they take from their surroundings defined (a ``loader``, a ``client``, a ``model``) and
the server's URL substituted, and compared with in-process torch: the Python SDK README's
drop-in optimizer, its error example and its embedding table, the README's LBFGS closure and
embedding table, ``optserve.RemoteEmbedding``'s docstring, docs/parameter-server.md's
synchronous and asynchronous workers, the README's history queries (bash and curl) and the
JavaScript client's README retry (node). The whole examples are test_doc_examples.py's."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import optserve
import optserve._embedding as optserve_embedding

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOC_URL = "http://127.0.0.1:8000"
SDK_README = ROOT / "clients" / "python" / "README.md"


def fragment(path: Path, heading: str, lang: str, nth: int = 0) -> str:
    """The ``nth`` ``lang`` code block after ``heading`` in ``path``."""
    text = path.read_text()
    blocks = re.findall(rf"```{lang}\n(.*?)```", text[text.index(heading):], re.S)
    assert len(blocks) > nth, f"no {lang} block {nth} after {heading!r} in {path.name}"
    return str(blocks[nth])


def run(code: str, where: str, **names: Any) -> tuple[dict[str, Any], str]:
    """Execute ``code`` with ``names`` defined; its namespace and what it printed."""
    namespace: dict[str, Any] = {"__name__": "__main__", **names}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, where, "exec"), namespace)
    return namespace, out.getvalue()


def replaced(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, (old, code)
    return code.replace(old, new)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture
def client(live_server: str) -> Any:
    with optserve.Client(live_server) as c:
        yield c


def test_sdk_readme_drop_in_optimizer_trains_as_local_adam(
        live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RemoteOptimizer(model.parameters(), "Adam", lr=1e-3)` with a local StepLR and
    clipping, its client from OPTSERVE_BASE_URL: the model and the saved state are those of
    the same block with torch.optim.Adam."""
    code = fragment(SDK_README, "## A drop-in remote optimizer", "python")
    remote = 'optserve.RemoteOptimizer(model.parameters(), "Adam", lr=1e-3)'
    local = replaced(code, remote, "torch.optim.Adam(model.parameters(), lr=1e-3)")
    monkeypatch.setenv("OPTSERVE_BASE_URL", live_server)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g))
              for _ in range(12)]
    spaces = []
    for body, folder in ((code, "remote"), (local, "local")):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        torch.manual_seed(0)
        spaces.append(run(body, "clients/python/README.md", loader=loader)[0])
    ours, theirs = spaces
    assert isinstance(ours["opt"], optserve.RemoteOptimizer)
    assert same(ours["model"], theirs["model"])
    saved = torch.load(tmp_path / "remote" / "opt.pt", weights_only=True)
    fresh = torch.optim.Adam(torch.nn.Linear(10, 1).parameters(), lr=1e-3)
    fresh.load_state_dict(saved)  # "loads into a local torch.optim.Adam"
    reference = theirs["opt"].state_dict()["state"]
    for i, state in reference.items():
        for key, value in state.items():
            assert torch.equal(saved["state"][i][key], value), (i, key)
    ours["opt"].close(delete_session=True)


def test_sdk_readme_error_example_prints_what_it_says(client: Any) -> None:
    code = fragment(SDK_README, "## Errors", "python")
    said = re.search(r"# (.*) \.\.\.\n", code)
    assert said, "the example no longer says what it prints"
    sid = client.create_session("Adam", {"w": torch.zeros(2, 3)}).id
    _, printed = run(code, "clients/python/README.md", client=client, sid=sid, torch=torch,
                     optserve=optserve)
    assert printed.startswith(said.group(1) + " "), (printed, said.group(1))
    assert client.get_session(sid).version == 0  # refused: nothing applied
    client.delete_session(sid)


def test_readme_lbfgs_closure_steps_as_torch_lbfgs(client: Any) -> None:
    code = fragment(ROOT / "README.md", "## LBFGS: the closure as a round trip", "python")
    local = replaced(code, 'optserve.RemoteOptimizer(model.parameters(), "LBFGS", client, ',
                     "torch.optim.LBFGS(model.parameters(), ")
    spaces = []
    for body in (code, local):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        start = copy.deepcopy(model)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        spaces.append(run(body, "README.md", model=model, x=x, y=y, client=client,
                          torch=torch, optserve=optserve)[0])
    ours, theirs = spaces
    assert same(ours["model"], theirs["model"]) and not same(ours["model"], start)
    assert client.get_session(ours["opt"].session_id).step == 1
    ours["opt"].close(delete_session=True)


def embedding_reference(rows: int, seed: int, head: torch.nn.Module, steps: list[Any],
                        optimizer: str = "SparseAdam", **options: Any) -> torch.nn.Embedding:
    """A local ``nn.Embedding(sparse=True)`` from the values ``RemoteEmbedding.create`` draws
    after ``torch.manual_seed(seed)``, stepped by ``steps(emb)`` under ``optimizer``."""
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(rows, 64, sparse=True, _weight=torch.randn(rows, 64))
    opt = getattr(torch.optim, optimizer)(emb.parameters(), **options)
    for step in steps:
        step(emb, head)
        opt.step()
        opt.zero_grad()
    return emb


@pytest.mark.parametrize("path, heading, rows", [
    (ROOT / "README.md", "## Embedding tables", "10_000_000"),
    (SDK_README, "## An embedding table on the server", "1_000_000"),
])
def test_embedding_fragment_steps_as_a_local_sparse_embedding(
        client: Any, path: Path, heading: str, rows: str) -> None:
    """The table is made smaller (1,000 rows: the example's size is a gigabyte upload); the
    rows the ids touched are SparseAdam's on nn.Embedding(sparse=True)'s gradient."""
    code = replaced(fragment(path, heading, "python"),
                    f"RemoteEmbedding.create(client, {rows}, 64,",
                    "RemoteEmbedding.create(client, 1_000, 64,")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1_000, (8, 5), generator=g)
    ids[1, 2] = ids[0, 0]  # a repeated id
    torch.manual_seed(1)
    head = torch.nn.Linear(64, 1)
    head2 = copy.deepcopy(head)
    torch.manual_seed(2)
    ns, _ = run(code, path.name, client=client, head=head, ids=ids, torch=torch,
                optserve=optserve)

    def step(emb: torch.nn.Embedding, h: torch.nn.Module) -> None:
        h(emb(ids).mean(1)).sum().backward()

    emb = embedding_reference(1_000, 2, head2, [step], lr=1e-3)
    touched = torch.unique(ids)
    got = client.pull_rows(ns["table"].session_id, {"weight": touched}).params["weight"]
    assert torch.equal(got._values(), emb.weight.detach()[touched])
    assert head.weight.grad is not None and head2.weight.grad is not None
    assert torch.equal(head.weight.grad, head2.weight.grad)
    client.delete_session(ns["table"].session_id)


def test_remote_embedding_docstring_trains_as_a_local_sparse_embedding(client: Any) -> None:
    text = optserve_embedding.__doc__
    assert text, "the RemoteEmbedding module has no docstring"
    match = re.search(r"::\n\n(.*?)\n\n", text, re.S)
    assert match, "no example in the RemoteEmbedding module's docstring"
    code = replaced(re.sub(r"(?m)^    ", "", match.group(1)),
                    "RemoteEmbedding.create(client, 10_000_000, 64,",
                    "RemoteEmbedding.create(client, 1_000, 64,")
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 1_000, (16, 4), generator=g), torch.randn(16, generator=g))
               for _ in range(4)]
    torch.manual_seed(5)
    ns, _ = run(code, "optserve/_embedding.py", client=client, batches=batches, torch=torch,
                optserve=optserve, F=torch.nn.functional)

    torch.manual_seed(5)
    torch.randn(1_000, 64)  # what the create drew, before the block's head
    head = torch.nn.Linear(64, 1)
    head_opt = torch.optim.Adam(head.parameters())
    steps = []
    for ids, y in batches:
        def step(emb: torch.nn.Embedding, h: torch.nn.Module, ids: Any = ids, y: Any = y) -> None:
            torch.nn.functional.mse_loss(h(emb(ids).mean(1)).squeeze(1), y).backward()
            head_opt.step()
            head_opt.zero_grad()
        steps.append(step)
    emb = embedding_reference(1_000, 5, head, steps, lr=1e-3)
    touched = torch.unique(torch.cat([ids.reshape(-1) for ids, _ in batches]))
    got = client.pull_rows(ns["table"].session_id, {"weight": touched}).params["weight"]
    assert torch.equal(got._values(), emb.weight.detach()[touched])
    assert same(ns["head"], head)
    client.delete_session(ns["table"].session_id)


def test_parameter_server_sync_fragment_is_full_batch_adam(live_server: str) -> None:
    """Four workers (threads sharing the block's client), each on its own quarter of the
    spirals: every round steps the mean of their gradients, which is torch's Adam on the mean
    of the four shards' losses, bit for bit (the sum in worker order, divided once)."""
    from examples.parameter_server.train import make_model, spirals

    page = ROOT / "docs" / "parameter-server.md"
    code = fragment(page, "### Synchronous rounds", "python")
    sid = f"ps-{uuid.uuid4().hex[:8]}"
    code = replaced(code, DOC_URL, live_server).replace('"ps"', json.dumps(sid))
    setup, worker = re.split(r"# in worker k.*\n", code)
    x_all, y_all = spirals()
    rounds = 3
    loss_fn = torch.nn.functional.cross_entropy
    shared, _ = run(setup, "parameter-server.md", make_model=make_model, optserve=optserve,
                    torch=torch)
    models: dict[int, torch.nn.Module] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            ns, _ = run(worker, "parameter-server.md", client=shared["client"], k=k,
                        model=make_model(), loss_fn=loss_fn, optserve=optserve,
                        shard_batches=[(x_all[k::4], y_all[k::4])] * rounds)
            models[k] = ns["model"]
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    reference = make_model()
    opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    for _ in range(rounds):
        grads = []
        for k in range(4):
            reference.zero_grad()
            loss_fn(reference(x_all[k::4]), y_all[k::4]).backward()
            grads.append([cast(torch.Tensor, p.grad).clone() for p in reference.parameters()])
        for i, p in enumerate(reference.parameters()):
            total = grads[0][i]
            for k in range(1, 4):
                total = total + grads[k][i]
            p.grad = total / 4
        opt.step()
    for k in range(4):
        assert same(models[k], reference), k
    assert shared["client"].get_session(sid).version == rounds
    shared["client"].delete_session(sid)
    shared["client"].close()


def test_parameter_server_async_fragment_refreshes_a_stale_worker(client: Any) -> None:
    """The block's worker is 5 versions behind when it steps (max_staleness 4): the step is
    the 409 ``stale_gradient`` the block catches, and ``pull_params()`` brings the model to the
    session's values."""
    page = ROOT / "docs" / "parameter-server.md"
    setup = fragment(page, "### Asynchronous pushes with bounded staleness", "python")
    sid = f"ps-async-{uuid.uuid4().hex[:8]}"
    setup = setup.replace('"ps-async"', json.dumps(sid))
    setup, stepping = setup.split("try:\n")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ns, _ = run(setup, "parameter-server.md", client=client, model=model, k=0, torch=torch,
                optserve=optserve, params=dict(model.named_parameters()))
    model(torch.ones(1, 3)).sum().backward()
    for _ in range(5):  # other workers
        client.step(sid, {"weight": torch.ones(1, 3), "bias": torch.ones(1)})
    run("try:\n" + stepping, "parameter-server.md", opt=ns["opt"], optserve=optserve)
    session = client.get_params(sid)
    assert session.version == 5  # the stale gradient was not applied
    assert torch.equal(model.weight.detach(), session.params["weight"])
    assert torch.equal(model.bias.detach(), session.params["bias"])
    client.delete_session(sid)


def test_readme_history_queries_answer_what_the_text_says(
        client: Any, live_server: str, tmp_path: Path) -> None:
    """`?since=100&fields=lr,grad_norm,scalars` gives those columns of rows after 100, the
    norms torch's; `?points=500` as CSV gives at most 500 buckets of `<name>.min`/`.max`."""
    code = fragment(ROOT / "README.md", "Each session keeps these rows in a bounded ring",
                    "bash")
    sid = f"s1-{uuid.uuid4().hex[:8]}"
    script = f"B={live_server}\n" + code.replace("sessions/s1/", f"sessions/{sid}/")
    client.create_session("SGD", {"w": torch.zeros(3)}, id=sid, options={"lr": 0.1})
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, generator=g) for _ in range(160)]
    for i, grad in enumerate(grads):
        client.step(sid, {"w": grad}, scalars={"loss": 1 / (i + 1)}, return_params=False)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["fields"] == ["n", "lr.0", "grad_norm.0", "scalars.loss"]
    columns = answer["columns"]
    assert columns["n"] == list(range(101, 161))
    assert columns["lr.0"] == [0.1] * 60
    assert columns["grad_norm.0"] == [torch.linalg.vector_norm(v).item() for v in grads[100:]]
    assert columns["scalars.loss"] == [1 / (i + 1) for i in range(100, 160)]
    lines = (tmp_path / "run.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert 1 < len(lines) <= 501 and {"lr.0.min", "lr.0.max", "scalars.loss.min",
                                      "grad_norm.0.max"} <= set(header)
    assert all(name.endswith((".min", ".max")) for name in header)
    client.delete_session(sid)


def test_js_readme_retry_fragment_steps_once(client: Any, live_server: str,
                                             tmp_path: Path) -> None:
    code = fragment(ROOT / "clients" / "js" / "README.md", "## Exactly once", "js")
    module = json.dumps((ROOT / "clients" / "js" / "optserve.js").as_uri())
    sid = client.create_session("SGD", {"x": torch.tensor([2.0])}, options={"lr": 1}).id
    script = (f"import {{ OptserveClient, Tensor, ConnectionError, UnavailableError }} "
              f"from {module};\n"
              f"const c = new OptserveClient({{ baseUrl: {json.dumps(live_server)} }});\n"
              f"const id = {json.dumps(sid)};\nconst grads = {{ x: Tensor.from([16]) }};\n"
              + code + "console.log(JSON.stringify({version: out.version, "
              "x: Array.from(out.params.x.data)}));\n")
    (tmp_path / "retry.mjs").write_text(script)
    done = subprocess.run(["node", str(tmp_path / "retry.mjs")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    x = torch.nn.Parameter(torch.tensor([2.0]))
    x.grad = torch.tensor([16.0])
    torch.optim.SGD([x], lr=1).step()
    assert json.loads(done.stdout) == {"version": 1, "x": x.detach().tolist()}
    client.delete_session(sid)
