#!/usr/bin/env python3
"""Container health check for optserve: exit 0 when GET /healthz answers 200 {"status": "ok"}.

Installed in the image as /usr/local/bin/optserve-healthcheck (the Dockerfile's HEALTHCHECK and
docker-compose.yml's healthcheck run it). Reads OPTSERVE_HOST / OPTSERVE_PORT like the server, so
it follows a changed port; a wildcard bind address is probed on loopback. Standard library only,
proxies ignored, one request with a short timeout.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("OPTSERVE_HOST", "127.0.0.1").strip()
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("OPTSERVE_PORT", "8000").strip() or "8000"
    url = f"http://{host}:{port}/healthz"
    timeout = float(os.environ.get("OPTSERVE_HEALTHCHECK_TIMEOUT", "3"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = json.load(response)
            status = response.status
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        print(f"optserve-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200 or body.get("status") != "ok":
        print(f"optserve-healthcheck: {url}: HTTP {status} {body!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
