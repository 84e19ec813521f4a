# optserve: torch.optim as an HTTP service, one uvicorn process per container.
#
# Default build (NVIDIA GPU capable):
#   docker build -t optserve:cuda .
# python:3.11-slim-bookworm + torch==2.13.0 from PyPI, which is the CUDA 13.0 build: its wheels
# carry the CUDA runtime, cuDNN, cuBLAS and NCCL, so the base image needs no CUDA toolkit. The
# host needs only an NVIDIA driver (>= 580 for CUDA 13) and the NVIDIA Container Toolkit
# (docker-compose.yml reserves the GPU). About 5.3 GB.
#
# CPU-only build (about 1.3 GB): take torch's CPU wheel (torch==2.13.0+cpu satisfies the lock's
# torch==2.13.0 and sorts above the PyPI build):
#   docker build -t optserve:cpu \
#     --build-arg PIP_EXTRA_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" .
#
# Any Debian/Ubuntu base works too (e.g. BASE_IMAGE=debian:bookworm-slim or an
# nvidia/cuda:*-ubuntu24.04 image): when the base has no python3 with venv, the first stage
# installs the distribution's python3 + python3-venv with apt (Python >= 3.11 is required).
#
# With podman/buildah, build with `--format docker` (the OCI format drops HEALTHCHECK).
#
# The Ray engine (docs/cluster.md) needs Ray in the image: --build-arg OPTSERVE_EXTRAS=ray (the
# lock's ray pin; about 240 MB more). The same image then runs a front, a Ray head or a worker.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- python-base: the base image plus a Python >= 3.11 with venv, and the service user ----
FROM ${BASE_IMAGE} AS python-base
# A base may end on a non-root USER; installing needs root (the runtime stage drops it again).
# hadolint ignore=DL3002,DL3066
USER root
# Distribution python3 only when the base lacks one; versions follow the base's release.
# hadolint ignore=DL3008
RUN if python3 -m venv /tmp/venv-probe >/dev/null 2>&1; then \
        echo "python-base: using $(command -v python3)"; \
    elif command -v apt-get >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    else \
        echo "python-base: BASE_IMAGE has no python3 with venv and no apt-get to install one" >&2; \
        exit 1; \
    fi \
    && rm -rf /tmp/venv-probe \
    && python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "python-base: optserve needs Python >= 3.11, the base has " + sys.version)' \
    && groupadd --system --gid 10001 optserve \
    && useradd --system --no-log-init --uid 10001 --gid optserve \
        --home-dir /home/optserve --create-home --shell /usr/sbin/nologin optserve

# ---- lock: the runtime part of requirements-lock.txt ----
# Every pin of the lock except the dev-only tools (pytest, ruff, mypy, ...); lock-runtime fails
# the build when a runtime dependency of pyproject.toml is not pinned there. A stage of its own,
# so that edits to pyproject.toml that leave this list alone keep the torch layer cached.
FROM python-base AS lock
# Extras of the server to install too (comma-separated): "ray" for the Ray engine.
ARG OPTSERVE_EXTRAS=""
WORKDIR /src
COPY pyproject.toml requirements-lock.txt ./
COPY deploy/lock-runtime.py /usr/local/bin/lock-runtime
RUN python3 /usr/local/bin/lock-runtime --extras "$OPTSERVE_EXTRAS" pyproject.toml \
        requirements-lock.txt > /runtime-lock.txt

# ---- deps: a venv with the locked runtime dependencies (the big, rarely rebuilt layer) ----
FROM python-base AS deps
# Extra pip options, split on spaces: an index for torch's CPU wheel, or find-links to local
# wheels (scripts/test-image passes `--find-links /wheels` with the wheel folder mounted there).
# Used in the deps and wheel stages only, so they stay out of the final image's history.
ARG PIP_EXTRA_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=lock /runtime-lock.txt /tmp/runtime-lock.txt
# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA_ARGS -r /tmp/runtime-lock.txt \
    && rm /tmp/runtime-lock.txt

# ---- wheel: the project (server package `app`, SDK package `optserve`) as a wheel ----
FROM deps AS wheel
ARG PIP_EXTRA_ARGS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY clients/python ./clients/python
# Built with the venv's own setuptools (torch depends on it; installed here when missing) and
# no build isolation: pip would not hand options such as --cert to an isolated build env.
# hadolint ignore=SC2086
RUN /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA_ARGS "setuptools>=68" \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

# ---- runtime ----
FROM python-base AS runtime
LABEL org.opencontainers.image.title="optserve" \
      org.opencontainers.image.description="PyTorch's torch.optim as an HTTP service" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=deps /opt/venv /opt/venv
# The project on top, from local files only, then a check that the environment is whole.
# (COPY, not RUN --mount=from=wheel: buildah's layer cache ignores what a mount holds.)
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c 'import app.main, torch; print("build: torch", torch.__version__, "cuda", torch.version.cuda)' \
    && /opt/venv/bin/python -c 'from app.api.docs_pages import STATIC_DIR as d; assert (d / "swagger-ui/swagger-ui-bundle.js").is_file() and (d / "redoc/redoc.standalone.js").is_file(), "docs assets missing from the wheel"'
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/optserve-healthcheck
# /data is reserved for the persistent session store; it must belong to the service user
# before VOLUME so that a fresh named volume is created writable for it.
RUN mkdir -p /data \
    && chown optserve:optserve /data \
    && chmod 0750 /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPTSERVE_HOST=0.0.0.0 \
    OPTSERVE_PORT=8000 \
    OPTSERVE_DATA_DIR=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/optserve
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["optserve-healthcheck"]
# uvicorn drains for up to 30 s on SIGTERM (give `docker stop` / compose a longer grace period).
# Exit code 2 = a configuration error (one line on stderr): restarting cannot fix it. Compose
# runs `python -m app --check-config` first (docker-compose.yml), so it never restart-loops.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
