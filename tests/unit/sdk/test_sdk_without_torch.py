"""The SDK without torch (its only hard dependencies are httpx and numpy), in a subprocess
where ``import torch`` fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optserve

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError

    import httpx
    import numpy as np

    import optserve
    from optserve import _safetensors as st
    from optserve import _tensors as T

    assert not T.HAS_TORCH and not T.USE_TORCH

    def respond(request):
        sent, _ = st.loads(request.content)
        x = np.frombuffer(sent["x"].data, dtype="<f4")
        new = {"x": T.to_wire(np.array([2.0], np.float32) - x)}
        meta = {"version": "1", "step": "1", "lr": "[1.0]", "skipped": "false"}
        return httpx.Response(200, content=st.dumps(new, meta),
                              headers={"Content-Type": "application/octet-stream"})

    client = optserve.Client("http://test", http_client=httpx.Client(
        transport=httpx.MockTransport(respond)))
    result = client.step("s", {"x": np.array([16.0], np.float32)})
    x = result.params["x"]
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.tolist() == [-14.0]
    assert (result.version, result.step, result.lr) == (1, 1, [1.0])
    result = client.step("s", {"x": [16.0]})  # plain lists work too
    assert result.params["x"].tolist() == [-14.0]

    bf16 = st.WireTensor("bfloat16", (1,), memoryview(b"\\x80\\x3f"))  # 1.0
    assert T.encode_json_tensor(bf16)["data"] == [1.0]  # readable as JSON without torch
    try:
        T.from_wire(bf16)
    except TypeError as exc:
        assert "bfloat16" in str(exc) and "torch" in str(exc)
    else:
        raise AssertionError("bfloat16 decoded to numpy")

    try:
        optserve.RemoteOptimizer
    except ImportError as exc:
        assert "pip install './clients/python[torch]'" in str(exc), exc
        assert "pip install torch" in str(exc), exc
    else:
        raise AssertionError("RemoteOptimizer imported without torch")
    print("ok")
    """
)


def test_sdk_works_without_torch() -> None:
    package_root = Path(optserve.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
