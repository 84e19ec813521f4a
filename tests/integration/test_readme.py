"""The README's Python quickstart, run as written against a live server: it must work, leave no
session behind, write a checkpoint torch loads, and train exactly as a local torch.optim.Adam
does (same torch build, CPU: bitwise)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"
REMOTE = ('optserve.RemoteOptimizer(model.parameters(), optimizer="Adam", client=client,\n'
          '                              lr=0.05)')


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart in Python"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's Python quickstart"
    return match.group(1)


def run(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    monkeypatch.chdir(cwd)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md quickstart", "exec"), namespace)
    return namespace, out.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_quickstart_runs_and_matches_local_torch(
        live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = quickstart()
    assert code.count(README_URL) == 1 and code.count(REMOTE) == 1
    for needed in ("import optserve", "with optserve.RemoteOptimizer", "client.close()"):
        assert needed in code
    before = {s["id"] for s in httpx.get(f"{live_server}/v1/sessions").json()["sessions"]}

    remote_dir, local_dir = tmp_path / "remote", tmp_path / "local"
    remote_dir.mkdir()
    local_dir.mkdir()
    remote, printed = run(code.replace(README_URL, live_server), remote_dir, monkeypatch)
    # the same program with torch's own Adam in place of the remote one
    local, local_printed = run(code.replace(REMOTE, "contextlib.nullcontext(torch.optim.Adam("
                                            "model.parameters(), lr=0.05))")
                               .replace("import torch\n", "import contextlib\n\nimport torch\n"),
                               local_dir, monkeypatch)

    for (name, p), q in zip(remote["model"].named_parameters(), local["model"].parameters(),
                            strict=True):
        assert torch.equal(p, q), name
    assert printed == local_printed and printed.startswith("final loss ")
    final_loss = float(printed.split()[2].rstrip(","))
    assert final_loss < 0.001, printed  # it learned: the noise is 0.01**2 = 1e-4
    assert "lr 0.0125" in printed  # StepLR ran locally: 0.05 * 0.5**2 after 100 steps

    # a checkpoint torch loads into a local Adam, equal to the local run's own state
    saved = torch.load(remote_dir / "opt.pt", weights_only=True)
    reference = local["opt"].state_dict()
    fresh = torch.optim.Adam(torch.nn.Linear(10, 1).parameters(), lr=0.05)
    fresh.load_state_dict(saved)
    for i, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(saved["state"][i][key], value), (i, key)

    # and nothing left on the server
    after = {s["id"] for s in httpx.get(f"{live_server}/v1/sessions").json()["sessions"]}
    assert after <= before, after - before
    assert remote["opt"].session_id not in after
