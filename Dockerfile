# dot-proxy container image. BASE_IMAGE is an argument so that the image can be built on a base
# made locally where Docker Hub is out of reach.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dot_proxy ./dot_proxy
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
# Runs as an unprivileged user from the start. Docker and podman let containers bind ports
# below 1024 without privilege (net.ipv4.ip_unprivileged_port_start=0 in the container).
RUN useradd --system --uid 10053 --no-create-home --shell /usr/sbin/nologin dotproxy
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER dotproxy
EXPOSE 53/udp 53/tcp
# python is PID 1: trio's signal receiver turns SIGTERM into a graceful stop and exit 0.
ENTRYPOINT ["python", "-m", "dot_proxy"]
