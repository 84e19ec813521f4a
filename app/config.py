"""One settings object, read from ``OPTSERVE_*`` environment variables (or ``.env``).

A setting that cannot work is a :class:`ConfigError` whose message is one line naming the
variable (``OPTSERVE_PORT: ...``); ``python -m app`` prints it and exits 2, before anything
else starts.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.chunked import DEFAULT_CHUNK, NORM_PIECE, SMALLEST_IN_CHUNKS
from app.transport import stale_dirs

ENV_PREFIX = "OPTSERVE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")
#: the exit code of a process that refuses its configuration (as sysexits' EX_USAGE family)
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one line naming the variable."""


def env_name(field: str) -> str:
    """The environment variable of a settings field (``port`` -> ``OPTSERVE_PORT``)."""
    return ENV_PREFIX + field.upper()


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``cuda`` only where torch sees CUDA."""
    value = value.strip().lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {value!r:.40}")
    if value.startswith("cuda"):
        import torch  # only here: the other settings are checked without loading torch

        if not torch.cuda.is_available():
            raise ValueError(f"{value} was asked for but torch sees no CUDA device here "
                             f"(torch {torch.__version__}, CUDA build: "
                             f"{torch.version.cuda or 'no'}); use auto or cpu")
        index = int(value.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"{value} was asked for but there {'is' if count == 1 else 'are'} "
                             f"only {count} CUDA device{'' if count == 1 else 's'} "
                             f"(cuda:0..cuda:{count - 1})")
    return value


class Settings(BaseSettings):
    """Every knob has a default that works on a laptop with no GPU."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", env_file=".env", extra="ignore")

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    device: str = Field(
        default="auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available)"
    )
    max_body_mb: float = Field(default=512.0, gt=0, description="largest accepted request body")
    max_bodies_mb: int = Field(
        default=0, ge=0, le=1 << 30,
        description="MiB of request bodies (those above 256 KiB) held at once, all connections "
        "together; a body that does not fit waits for room for at most body_timeout_s, then "
        "is a 503 server_bodies_full (Retry-After: 1) (0: half of the memory the server may "
        "use: its cgroup's limit, else the machine's; never less than max_body_mb)")
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="408 when a request body stalls this long (no bytes)"
    )
    body_min_kib_s: float = Field(
        default=64.0, ge=0,
        description="408 and close when a request body has not arrived whole within "
        "body_timeout_s plus its bytes at this many KiB/s (a body trickled a byte at a time "
        "gets body_timeout_s in all); 0: no whole-body deadline, only body_timeout_s between "
        "bytes")
    head_timeout_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="408 and close when a request line and headers are not complete this long "
        "after the connection opened or its previous answer ended (python -m app)")
    max_head_kb: int = Field(
        default=64, ge=1, le=1024,
        description="431 when a request line and headers pass this many KiB (python -m app)")
    max_headers: int = Field(
        default=200, ge=1, le=10_000,
        description="431 when a request has more header lines than this (python -m app)")
    max_connections: int = Field(
        default=0, ge=0,
        description="503 too_many_connections and close for a connection (HTTP or same-host) "
        "past this many open at once (0: the soft RLIMIT_NOFILE less a quarter of it, at least "
        "64, kept for the server's files)")
    torch_threads: int = Field(
        default=0, ge=0, description="torch intra-op threads on the worker (0: torch's default)"
    )
    gc_freeze_sessions: bool = Field(
        default=True,
        description="keep sessions' parameters and optimizer state out of Python's cyclic "
        "garbage collector's walks (gc.freeze once 10,000 new ones gathered; one full "
        "collection once idle after a freeze frees what a freeze trapped): python -m app only")
    step_chunk: int = Field(
        default=DEFAULT_CHUNK, ge=0,
        description="CPU steps of elementwise optimizers (Adam, SGD, ...) take float32/float64 "
        f"parameters of at least {SMALLEST_IN_CHUNKS} chunks of this many elements chunk by "
        "chunk (the same values, cache-sized passes and temporaries; 0: never, else a multiple "
        f"of {NORM_PIECE}, the pieces the per-step metrics take norms of)")
    default_nonfinite: Literal["reject", "skip", "allow"] = "reject"
    data_dir: Path = Field(default=Path("data"), description="where sessions are persisted")
    data_dir_wait_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="how long a start waits for another process to release the data directory "
        "(one process at a time holds it) before it fails")
    ready_min_free_bytes: int = Field(
        default=16 << 20, ge=0,
        description="/readyz answers 503 not_ready while the data directory has less free "
        "space than this many bytes (statvfs f_bavail * f_frsize, measured at most once a "
        "second), before a write fails for want of it; 0: never. Not checked with durability "
        "memory")
    durability: Literal["step", "interval", "memory"] = Field(
        default="step",
        description="default for sessions: step (fsync before acknowledging), interval "
        "(fsync every fsync_interval_ms), memory (no disk)",
    )
    fsync_interval_ms: float = Field(default=50.0, gt=0, le=60_000)
    snapshot_every_steps: int = Field(default=1000, ge=1)
    snapshot_every_s: float = Field(default=300.0, gt=0)
    snapshot_every_mb: float = Field(
        default=1024.0, gt=0,
        description="also snapshot a session once its log holds this many MB since its last "
        "snapshot (bounds the disk a large session's log takes and the replay at restart)",
    )
    api_keys: str = Field(default="", description="key:tenant pairs, comma-separated")
    api_keys_file: Path | None = Field(default=None, description="file of key:tenant lines")
    allow_open: bool = Field(default=False, description="allow a non-loopback bind without keys")
    metrics_tenants: str = Field(
        default="", description="with API keys: the tenants whose keys may read /metrics "
        "(its totals are server-wide), comma-separated; empty: any key's tenant")
    max_sessions: int = Field(default=0, ge=0, description="per tenant; 0 = unlimited")
    max_open_logs: int = Field(
        default=0, ge=0, le=1_000_000,
        description="session logs kept open at once; the least recently used are closed and "
        "reopened by their session's next write (0: the soft RLIMIT_NOFILE / 8, at least 32)")
    max_session_elements: int = Field(default=0, ge=0, description="0 = unlimited")
    max_session_params: int = Field(
        default=100_000, ge=0,
        description="parameters (tensors) per session; 0 = unlimited. Each costs the server "
        "some kilobytes and some microseconds a step whatever its size: a 60 MB JSON create of "
        "a million one-element parameters took a server 3 GB and a minute, its first step 5 GB")
    idempotency_window: int = Field(
        default=1000, ge=1, le=1_000_000,
        description="Idempotency-Key answers each session remembers (its last N keys)")
    local_transport: bool = Field(
        default=True, description="offer clients on this machine the shared-memory transport "
        "(a Unix socket in a private directory; GET /v1/transport tells loopback clients where)")
    max_bindings: int = Field(
        default=0, ge=0, le=1_000_000,
        description="sessions bound to shared-memory segments at once on all same-host "
        "connections together; one more bind is a 503 server_bindings_full (Retry-After: 1) "
        "and the SDK steps that session over HTTP (0: vm.max_map_count / 8, at least 64)")
    max_binding_mb: int = Field(
        default=0, ge=0, le=1 << 30,
        description="MiB of memory the same-host bindings may hold at once, all connections "
        "together (a binding holds its session's parameter bytes twice, three times under "
        "durability interval or step); a bind past it is a 503 server_bindings_full and the "
        "SDK steps that session over HTTP (0: half of the memory the server may use: its "
        "cgroup's limit, else the machine's)")
    local_dir: Path | None = Field(
        default=None, description="where the same-host transport's private socket directory is "
        "made (default: the system's temporary directory)")
    evaluation_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="how long an open LBFGS step waits for each evaluation before it is "
        "abandoned (the session unchanged); a step may ask for less or more with ?timeout_s=")
    metrics: bool = Field(
        default=True, description="per-step norms on the device for sessions that do not set "
        "\"metrics\" (gradient, update and parameter norms per group)")
    history_steps: int = Field(
        default=100_000, ge=0, le=10_000_000,
        description="rows of per-step metrics a session keeps unless it sets \"history\"")
    engine: Literal["embedded", "ray"] = Field(
        default="embedded", description="embedded: sessions in this process; ray: sessions on "
        "Ray actor hosts (from the repository's root: pip install '.[ray]'; docs/cluster.md)")
    ray_address: str = Field(
        default="local", description="the Ray cluster: local (start one in this process), "
        "auto, or HOST:PORT of its GCS")
    ray_namespace: str = Field(default="optserve", min_length=1, max_length=64,
                               description="Ray namespace of the host actors")
    ray_resources: str = Field(
        default='{"num_cpus": 1}', description="what a session host asks Ray for, unless the "
        "create says: JSON {num_cpus, num_gpus, memory, resources: {custom: n}}")
    ray_placement: Literal["pack", "spread"] = Field(
        default="spread", description="choosing a host for a new session: pack (fill hosts) "
        "or spread (one more host while the cluster has room)")
    ray_sessions_per_host: int = Field(default=0, ge=0,
                                       description="sessions per host actor (0: no limit)")
    ray_host_start_timeout_s: float = Field(
        default=120.0, gt=0, description="503 when Ray cannot start a host this fast (no room)")
    ray_commit_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a sharded operation waits for a restarting "
        "shard host before answering 503 (it completes later)")
    warm_up: bool = Field(default=True, description="load torch's kernels for every optimizer "
                          "before readiness (the first request does not pay for them)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line, with request ids")


    cors_origins: str = Field(
        default="", description="origins allowed to call the API from a browser, "
        "comma-separated (https://app.example.com); empty: no CORS headers")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("local_dir")
    @classmethod
    def _local_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not stale_dirs.fits(value):
            raise ValueError(
                f"must be at most {stale_dirs.MAX_PARENT_BYTES} bytes long, not "
                f"{len(os.fsencode(str(value)))}: the same-host transport's socket is made in a "
                f"folder in it, and a Unix socket's path has at most "
                f"{stale_dirs.MAX_SOCKET_PATH} bytes")
        return value

    @field_validator("step_chunk")
    @classmethod
    def _step_chunk(cls, value: int) -> int:
        if value % NORM_PIECE:
            raise ValueError(f"must be 0 (never chunk) or a multiple of {NORM_PIECE} elements "
                             "(the pieces the per-step metrics take norms of, which a chunk "
                             "holds whole)")
        return value

    def metrics_tenant_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.metrics_tenants.split(",") if t.strip())

    @field_validator("metrics_tenants")
    @classmethod
    def _metrics_tenants(cls, value: str) -> str:
        for tenant in (t.strip() for t in value.split(",") if t.strip()):
            if not _TENANT_RE.match(tenant):
                raise ValueError(f"tenant names are 1-64 of [A-Za-z0-9_.-], not starting with "
                                 f"'.' or '-', got {tenant!r:.80}")
        return value

    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @field_validator("cors_origins")
    @classmethod
    def _cors(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin != "*" and not re.match(r"^https?://[^/\s]+/?$", origin):
                raise ValueError(f"{origin!r:.80} is not an origin; write scheme://host[:port] "
                                 "(https://app.example.com), comma-separated, or *")
        return value


# Not starting with '.' or '-': a session's directory is "<tenant>~<id>", and the store skips
# names starting with '.' (its own temporary and deleted directories).
_TENANT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: the tenant of a bare key and of every request without keys (the engine's DEFAULT_TENANT)
DEFAULT_TENANT = "default"


def parse_keys(spec: str, file: Path | None) -> dict[str, str]:
    """``key:tenant`` pairs separated by commas or newlines (a bare key is the default
    tenant), from the variable and/or a file. Lines starting with # are ignored.

    A bad entry is a :class:`ConfigError` naming the variable (and the file's line), never
    the key itself."""
    sources = [(spec, "OPTSERVE_API_KEYS")]
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"OPTSERVE_API_KEYS_FILE: cannot read {str(file)!r:.200}: "
                              f"{exc.strerror or exc}") from None
        sources.append((text, "OPTSERVE_API_KEYS_FILE"))
    keys: dict[str, str] = {}
    for text, variable in sources:
        for number, line in enumerate(text.split("\n"), 1):
            where = f"{variable} line {number}" if variable.endswith("FILE") else variable
            for raw in line.split(","):
                _add_key(keys, raw, where)
    return keys


def metrics_readers(settings: Settings, keys: dict[str, str]) -> frozenset[str]:
    """The tenants whose keys may read ``/metrics`` (``OPTSERVE_METRICS_TENANTS``; empty: any
    key's). With keys, one that no key is for is a :class:`ConfigError`: a typo there would
    answer every key with a 403, Prometheus' too. (Without keys every request is the default
    tenant's and ``/metrics`` is open: the setting is moot.)"""
    named = settings.metrics_tenant_set()
    missing = sorted(named - set(keys.values())) if keys else []
    if missing:
        raise ConfigError(f"OPTSERVE_METRICS_TENANTS: no API key is for tenant "
                          f"{missing[0]!r:.80}, so no key could read /metrics as that tenant "
                          f"(the keys' tenants: {', '.join(sorted(set(keys.values())))})")
    return named


def _add_key(keys: dict[str, str], raw: str, where: str) -> None:
    item = raw.strip()
    if not item or item.startswith("#"):
        return
    key, _, tenant = item.partition(":")
    key, tenant = key.strip(), (tenant.strip() or DEFAULT_TENANT)
    if len(key) < 16:
        raise ConfigError(f"{where}: API keys must be at least 16 characters (one has "
                          f"{len(key)}); make one with: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'")
    if not _TENANT_RE.match(tenant):
        raise ConfigError(f"{where}: tenant names are 1-64 of [A-Za-z0-9_.-], not starting "
                          f"with '.' or '-', got {tenant!r:.80}")
    if keys.get(key, tenant) != tenant:
        raise ConfigError(f"{where}: one API key is given for two tenants")
    keys[key] = tenant


def describe(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``OPTSERVE_X='bad': why; OPTSERVE_Y=...``."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        name = env_name(str(loc[0])) if loc else "settings"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        value = err.get("input")
        shown = f"={value!r:.60}" if isinstance(value, str | int | float) and \
            name not in (env_name("api_keys"),) else ""
        parts.append(f"{name}{shown}: {msg}")
    return "; ".join(parts)


#: OPTSERVE_* names that are no server setting but another tool's here, close to a setting's
#: name (the Python SDK's key; the tests' body bound): never reported as a misspelt setting
NOT_SETTINGS = frozenset({"OPTSERVE_API_KEY"})
NOT_SETTINGS_PREFIXES = ("OPTSERVE_TEST_",)


def misspelt_settings(names: Iterable[str]) -> list[tuple[str, str]]:
    """Of ``names`` (environment variables, ``.env`` keys), the ``OPTSERVE_*`` ones that are
    no setting but come close to one, each with the setting it likely meant
    (``OPTSERVE_DURABILTY`` -> ``OPTSERVE_DURABILITY``). The settings ignore names they do not
    know, so a typo would otherwise run the server at that setting's default without a word.
    Names close to none (the scripts' ``OPTSERVE_PUBLISH_PORT``, the SDK's
    ``OPTSERVE_BASE_URL``) are left alone."""
    settings = sorted(env_name(f) for f in Settings.model_fields)
    known = set(settings)
    out = []
    for name in sorted(set(names)):
        upper = name.upper()
        if (not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_SETTINGS
                or upper.startswith(NOT_SETTINGS_PREFIXES)):
            continue
        close = difflib.get_close_matches(upper, settings, n=1, cutoff=0.85)
        if close:
            out.append((name, close[0]))
    return out


def warn_misspelt_settings(log: logging.Logger) -> None:
    """Warn once per :func:`misspelt_settings` name of the environment and ``.env``."""
    for name, meant in misspelt_settings([*os.environ, *dotenv_names()]):
        log.warning("%s is not a setting and is ignored; did you mean %s? (the server runs "
                    "with %s as set, or at its default)", name, meant, meant)


def dotenv_names(path: str | Path = ".env") -> list[str]:
    """The names the ``.env`` file the settings read sets (none when there is none)."""
    try:
        from dotenv import dotenv_values
        return [k for k in dotenv_values(path) if k]
    except (OSError, ImportError, UnicodeDecodeError, ValueError):
        return []


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment (and ``.env``); :class:`ConfigError` (one line naming
    each bad variable) instead of pydantic's report."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def get_settings() -> Settings:
    return load_settings()
