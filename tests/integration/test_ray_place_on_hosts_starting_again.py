"""A create on a Ray cluster whose hosts fill it and are starting again (a restart of the whole
cluster, or hosts killed for good: the front starts them again from host.json) goes to those
hosts, as docs/cluster.md's ``spread`` says (no room: the hosts of its shape), not to a new
host that waits for room they take: that create was a 503 ``no_capacity`` once
``OPTSERVE_RAY_HOST_START_TIMEOUT_S`` ran out (seen after ``docker compose --profile ray up``
made the cluster anew). The sharded session made then steps as in-process torch, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import optserve
from app.engine import ray_host
from tests.conftest import LiveServer, kill_hosts, ray_settings

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def test_a_create_takes_the_hosts_starting_again(ray_cluster: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    # hosts of a shape of their own, two of which fill the cluster (other tests' hosts ask
    # no memory); their restore after the kill cannot answer the placement's ping this fast
    memory = int(ray.cluster_resources()["memory"] * 0.4)
    shape = {"num_cpus": 0, "memory": memory}
    settings = ray_settings(ray_cluster, ray_resources=json.dumps(shape),
                            ray_placement="spread", ray_host_start_timeout_s=15.0)
    gen = torch.Generator().manual_seed(3)
    init = {"x": torch.randn(5, generator=gen), "y": torch.randn(3, generator=gen)}
    with LiveServer(settings).serving() as url, optserve.Client(url) as client:
        for sid in ("first", "second"):
            client.create_session("SGD", {"w": torch.ones(2)}, options={"lr": 0.5}, id=sid)
        assert len(kill_hosts(Path(settings.data_dir))) == 2
        monkeypatch.setattr(ray_host, "PLACE_PING_TIMEOUT_S", 0.001)

        client.create_session("Adam", init, options={"lr": 0.01}, id="sharded", shards=2)
        hosts = sorted(p.parent.name for p in (Path(settings.data_dir) / "hosts").glob(
            "*/host.json"))
        assert len(hosts) == 2, hosts  # no third host
        placement = httpx.get(f"{url}/v1/sessions/sharded").json()["placement"]
        assert sorted(s["host"] for s in placement["shards"]) == hosts

        params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
        opt = torch.optim.Adam(params.values(), lr=0.01)
        for k in range(3):
            grads = {n: torch.randn(t.shape, generator=gen) for n, t in init.items()}
            out = client.step("sharded", grads)
            for n, g in grads.items():
                params[n].grad = g.clone()
            opt.step()
            for n in init:
                assert torch.equal(out.params[n].view(torch.int32),
                                   params[n].detach().view(torch.int32)), (k, n)
        for sid in ("first", "second"):  # restored on their hosts
            assert torch.equal(client.get_params(sid).params["w"], torch.ones(2))
        kill_hosts(Path(settings.data_dir))
