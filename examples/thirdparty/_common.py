"""What the third-party checks share: a server to run against, the data, the comparison."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from examples.parameter_server.train import local_server

__all__ = ["compare", "data", "server", "state_mismatches"]


@contextmanager
def server(url: str | None = None) -> Iterator[str]:
    """``url`` (else env ``OPTSERVE_BASE_URL``), or a local server started for the run."""
    url = url or os.environ.get("OPTSERVE_BASE_URL")
    if url:
        yield url
        return
    with local_server() as started:
        yield started


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.randn(8, 4, generator=g)).tanh()


def state_mismatches(a: Mapping[str, object], b: Mapping[str, object], prefix: str = ""
                     ) -> list[str]:
    """Keys where two (nested) state dicts differ: tensors compared bitwise."""
    out: list[str] = []
    if set(a) != set(b):
        return [f"{prefix}keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
    for key in a:
        x, y = a[key], b[key]
        where = f"{prefix}{key}"
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += state_mismatches(x, y, where + ".")
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not torch.equal(torch.as_tensor(x), torch.as_tensor(y)):
                out.append(where)
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                out.append(where)
            else:
                out += state_mismatches(dict(enumerate(x)), dict(enumerate(y)), where + ".")
        elif x != y:
            out.append(f"{where}: {x!r} != {y!r}")
    return out


def compare(label: str, local: Mapping[str, object], remote: Mapping[str, object]) -> bool:
    """Print whether two state dicts are equal (bitwise), and which keys are not."""
    bad = state_mismatches(local, remote)
    print(f"  {label}: {'equal' if not bad else 'DIFFERENT: ' + ', '.join(bad[:8])}")
    return not bad
