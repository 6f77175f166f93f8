# The token-broker image: a non-root sidecar that runs on a read-only root.
#
#   docker build --build-arg VERSION=0.1.0 -t token-broker:0.1.0 .
#   docker run --read-only -v /path/on/host:/run/token-broker \
#       -v /path/to/config.yaml:/etc/token-broker/config.yaml:ro token-broker:0.1.0
#
# BASE must hold python3 (3.11 or newer) with the venv module. The default is
# the official slim image; a machine without a registry passes a local one
# (scripts/image.sh builds a Debian root with debootstrap and imports it).
# The stage below builds a wheel from the source tree and installs it, with its
# dependencies from PyPI at the versions docker/constraints.txt pins, into
# /opt/token-broker; the runtime stage copies only
# that virtualenv, so no compiler, pip cache or source reaches the image.
ARG BASE=python:3.11-slim-bookworm

# DL3006 cannot see through the ARG: its default above carries the tag.
# hadolint ignore=DL3006
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md docker/constraints.txt ./
COPY broker/ broker/
# pip builds the wheel in an isolated environment of its own; pip and
# setuptools then leave the runtime venv: nothing installs at run time.
RUN python3 -m venv /opt/token-broker \
    && /opt/token-broker/bin/pip wheel --no-cache-dir --progress-bar off \
       --no-deps --wheel-dir /wheels . \
    && /opt/token-broker/bin/pip install --no-cache-dir --progress-bar off \
       --constraint constraints.txt /wheels/token_broker-*.whl \
    && /opt/token-broker/bin/pip uninstall --yes pip setuptools \
    && /opt/token-broker/bin/token-broker --version

# hadolint ignore=DL3006
FROM ${BASE}
ARG VERSION=unspecified
ARG REVISION=unspecified
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="OAuth 2.0 client-credentials tokens, fetched, refreshed and served to the services beside it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid, so that pod securityContexts, fsGroup and host volume
# owners can name it; the socket directory is the only place it writes.
RUN groupadd --gid 10001 token-broker \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin token-broker \
    && mkdir -p /etc/token-broker /run/token-broker \
    && chown 10001:10001 /run/token-broker \
    && chmod 0750 /run/token-broker

COPY --from=build /opt/token-broker /opt/token-broker

# The health URL is an environment variable because the metrics port comes
# from the config: set it when listen.metrics is not 127.0.0.1:9464.
ENV PATH=/opt/token-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKEN_BROKER_SOCKET=/run/token-broker/broker.sock \
    TOKEN_BROKER_HEALTH_URL=http://127.0.0.1:9464/healthz

USER 10001:10001
WORKDIR /etc/token-broker
STOPSIGNAL SIGTERM
# Exec form, no shell; proxies are ignored so the probe stays on loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/token-broker/bin/python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open(os.environ['TOKEN_BROKER_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["token-broker"]
CMD ["serve", "-c", "/etc/token-broker/config.yaml"]
