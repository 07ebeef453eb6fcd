# syntax=docker/dockerfile:1
#
# Targets (one Dockerfile, three stages):
#   builder  wheel of the project + a venv with the serving dependencies (no torch)
#   build    the `esans build` image: the builder's venv plus torch (CPU); used by the Job
#   serve    the default (last) target: `esans serve`, non-root, no compilers, no torch
#
#   docker build -t esans-sampler:0.1.0 .
#   docker build -t esans-sampler-build:0.1.0 --target build .

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (their own layer, rebuilt only when the pins change).
COPY deploy/requirements-serve.txt /src/deploy/requirements-serve.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r deploy/requirements-serve.txt
COPY pyproject.toml README.md /src/
COPY esans_sampler /src/esans_sampler
COPY esans_cli /src/esans_cli
COPY service /src/service
# The servers' code is imported as esans_service (the repository's symbolic link, made here
# since COPY does not carry links).
RUN ln -s service /src/esans_service
# The wheel goes in with --no-deps on top of the exact pins above (the client dependencies
# and the [serve] extra); serving never imports torch.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

# -- the codebook-building image (`esans build`, used by the esans-build Job) ------------
FROM python:3.11-slim AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/venv /opt/venv
# The CPU build of torch: PyPI's default linux wheel is the (much larger) CUDA one.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && groupadd --gid 10001 esans \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /work --shell /usr/sbin/nologin esans
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["esans"]
CMD ["--help"]

# -- the serving image (default target) ---------------------------------------------------
FROM python:3.11-slim AS serve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ESANS_DATA_DIR=/data
# /data holds the embedded Redis' files, used only when ESANS_REDIS_URL is unset.
RUN groupadd --gid 10001 esans \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data --shell /usr/sbin/nologin esans \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# gRPC, HTTP (JSON API, /healthz, /readyz, /metrics)
EXPOSE 50051 8000
# Liveness only (/healthz): /readyz is for load balancers, and a replica without a codebook
# yet is alive. Python's urllib, so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "esans_service.healthcheck"]
ENTRYPOINT ["esans"]
CMD ["serve"]
