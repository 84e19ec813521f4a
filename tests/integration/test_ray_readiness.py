"""The Ray engine's readiness ahead of a full disk (``OPTSERVE_READY_MIN_FREE_BYTES``), as the
embedded engine's (tests/integration/test_disk_full.py, ``test_ready_on_a_nearly_full_disk``):
a Ray-engine front whose data directory (which its hosts' stores are under, ``hosts/<name>/``)
has less free space than the bound says not ready, naming the bytes free and the setting,
while steps still succeed with torch.optim's values; ready again once space returns. A front
whose durability is ``memory`` does not check the bound (it stays ready under it; on a full
disk it is not ready all the same, as its front writes the directory of sessions there).
The hosts take the bound too: a host's own status says the same. Real small disks (tmpfs, as
root) and hosts on the test cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.integration.test_disk_full import (  # noqa: F401 - tmpfs is a fixture
    MEASURE_STANDS_S,
    Big,
    MiB,
    Mount,
    assert_ready,
    assert_short_of_space,
    fill,
    steps_while_short,
    tmpfs,
)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]

def host_status(data_dir: Path) -> Any:
    """The status the (one) host actor of a deployment gives of itself."""
    (name,) = [p.parent.name for p in (data_dir / "hosts").glob("*/host.json")]
    return ray.get(ray.get_actor(name, namespace="optserve").status.remote(False))


def test_a_ray_front_is_not_ready_on_a_nearly_full_disk(
        ray_cluster: Any, tmpfs: Mount) -> None:  # noqa: F811 - the fixture
    disk, memory_disk = tmpfs(8), tmpfs(8)
    live = LiveServer(ray_settings(ray_cluster, data_dir=disk, ready_min_free_bytes=4 * MiB))
    memory = LiveServer(ray_settings(ray_cluster, data_dir=memory_disk, durability="memory",
                                     ready_min_free_bytes=4 * MiB))
    url, memory_url = live.start(), memory.start()
    try:
        with httpx.Client(base_url=url, timeout=300) as c, \
                httpx.Client(base_url=memory_url, timeout=300) as m:
            assert_ready(c)
            assert_ready(m)
            big = Big("ray-nearly-full", 1000)
            assert big.create(c).status_code == 201
            assert host_status(disk).ready
            filler = fill(disk, leave=3 * MiB)
            fill(memory_disk, leave=3 * MiB)  # (under the bound, not full: see above)
            assert_short_of_space(c, disk)
            status = host_status(disk)
            assert not status.ready
            assert "OPTSERVE_READY_MIN_FREE_BYTES (4194304)" in status.reason
            assert_ready(m)
            steps_while_short(c, big)
            filler.unlink()
            time.sleep(MEASURE_STANDS_S)
            assert_ready(c)
            assert_ready(m)
            assert host_status(disk).ready
            big.assert_same(c, state=True)
    finally:
        live.stop()
        memory.stop()
        kill_hosts(disk)
        kill_hosts(memory_disk)
