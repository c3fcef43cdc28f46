# dot-proxy container image.
#
# BASE_IMAGE must provide python3 (3.11 or newer) with its venv module, CA certificates and
# useradd: python:3.12-slim does, and so does a Debian made with debootstrap where no image
# registry is in reach (docs/deploy.md). Build: `docker build -t dot-proxy .` (or podman).
# podman needs `--format docker` to keep the HEALTHCHECK (OCI images have no such field).
ARG BASE_IMAGE=docker.io/library/python:3.12-slim

FROM ${BASE_IMAGE} AS build
# A fixed uid and gid, so that Kubernetes can check runAsNonRoot against a number and a mounted
# CA file can be made readable to it. 10053 is a regular (not --system) id: out of the range of
# the host's own system users, and within useradd's UID_MIN..UID_MAX, so it warns about nothing.
# Made here and copied (both stages share the base): the final stage then runs no command, and
# nothing mounted into the build for pip (podman build --volume) leaves a trace there.
RUN groupadd --gid 10053 dotproxy \
    && useradd --uid 10053 --gid 10053 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin --no-log-init dotproxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dot_proxy ./dot_proxy
# The package and trio's dependencies, compiled to bytecode (the root filesystem is read-only
# at run time); then pip and setuptools leave the venv: nothing installs at run time.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python3 -m pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/venv/bin/python3 -m pip uninstall --yes --quiet pip setuptools \
    && rm -rf /opt/venv/bin/activate* /opt/venv/bin/pip* /opt/venv/include /opt/venv/share \
    && find /opt/venv/lib -depth -type d \( -name _tests -o -name tests \) -exec rm -rf {} + \
    && /opt/venv/bin/python3 -m compileall -q /opt/venv/lib

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="dot-proxy" \
      org.opencontainers.image.description="DNS-over-TLS forwarding proxy: plain DNS in on UDP/TCP, RFC 7858 TLS out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE}"
COPY --from=build /etc/passwd /etc/group /etc/
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DOT_PROXY_PORT=5300
USER 10053:10053
# Port 5300 inside, published as 53 (`-p 53:5300/udp -p 53:5300/tcp`): an unprivileged user
# cannot bind 53 where the runtime leaves net.ipv4.ip_unprivileged_port_start at 1024 (podman
# 4.3 does; Docker sets it to 0), and the image needs no capability at all this way.
EXPOSE 5300/udp 5300/tcp
# python is PID 1: trio's signal receiver turns SIGTERM into a graceful stop and exit 0.
STOPSIGNAL SIGTERM
# Liveness without the upstream: the proxy answers a query of an opcode it does not implement
# (NOTIMP) itself, over UDP and TCP, on the port and address it was configured with; with
# --metrics (DOT_PROXY_METRICS, or the --config file) /healthz must also answer 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["dot-proxy", "healthcheck"]
ENTRYPOINT ["dot-proxy"]
