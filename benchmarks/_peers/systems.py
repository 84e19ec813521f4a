"""Every registered system, in the order the table shows them. Importing this module fills
``base.REGISTRY``; add a system by registering it in a module imported here (see the
extension points at the end of ``http_systems.py``)."""

from __future__ import annotations

from benchmarks._peers import disk, http_systems, local, ray_ps, torch_rpc
from benchmarks._peers.base import REGISTRY

__all__ = ["REGISTRY", "disk", "http_systems", "local", "ray_ps", "torch_rpc"]

#: the default --systems, in table order (peers, then optserve, then the disk probe)
DEFAULT_ORDER = ("in-process", "in-process-heap", "echo", "ray", "torch-rpc",
                 "optserve-binary", "optserve-binary-st", "optserve-sdk-http", "optserve-shm",
                 "optserve-shm-copy",
                 "optserve-shm-nometrics", "optserve-bf16", "optserve-bf16-history",
                 "optserve-json", "disk-fsync")
