# homelabarr-supervisor: the one process of a HomelabARR installation that holds Docker access.
#
# Build online:   docker build -t homelabarr-supervisor .
# Build offline:  put prebuilt wheels (pip wheel . -w wheelhouse) in ./wheelhouse and pass a
#                 local base image: docker build --network none \
#                   --build-arg BASE_IMAGE=my-debian-python:12 -t homelabarr-supervisor .
# The base needs python3 with venv (python:3.12-slim, or Debian with python3-venv).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
COPY pyproject.toml README.md /src/
COPY supervisor /src/supervisor
# Always present (may hold only .gitkeep): prebuilt wheels make the build work offline.
COPY wheelhouse /wheelhouse
RUN set -eu; \
    if ! ls /wheelhouse/homelabarr_supervisor-*.whl >/dev/null 2>&1; then \
        python3 -m pip wheel --no-cache-dir /src -w /wheelhouse; \
    fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --no-cache-dir --no-index --find-links /wheelhouse \
        homelabarr-supervisor; \
    /opt/venv/bin/python -m pip uninstall -y -q pip setuptools 2>/dev/null || true; \
    find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="homelabarr-supervisor" \
      org.opencontainers.image.description="Event-driven Docker container mirror for HomelabARR, served over a local Unix socket" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/homelabarr/homelabarr-supervisor"
# A fixed non-root user. Its group is not the Docker socket's: that one comes from
# group_add (default mode) or is read at start-up (adaptive mode, see compose.yaml).
RUN set -eu; \
    echo 'supervisor:x:10001:10001:homelabarr-supervisor:/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'supervisor:x:10001:' >> /etc/group; \
    mkdir -p /run/homelabarr; \
    chown 10001:10001 /run/homelabarr; \
    chmod 0750 /run/homelabarr
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SUPERVISOR_API_SOCKET=/run/homelabarr/supervisor.sock \
    SUPERVISOR_METRICS_LISTEN=0.0.0.0:9856
USER 10001:10001
EXPOSE 9856
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["homelabarr-supervisor", "healthcheck"]
ENTRYPOINT ["homelabarr-supervisor"]
CMD ["run"]
