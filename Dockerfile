# The presence gateway image: `presence serve` from the project's wheel.
#
#   docker build -t presence-server:0.1.0 .
#   docker run -p 8765:8765 -p 9090:9090 -e PRESENCE_JWT_SECRET=... presence-server:0.1.0
#
# tests/test_packaging.py runs this file's pip and venv steps (the RUN lines that mention
# them, as written here) and its ENTRYPOINT and HEALTHCHECK against a clean virtualenv, so
# keep those steps plain shell that also works outside a container. See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- stage 1: build the wheel -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY presence ./presence
COPY cluster ./cluster
COPY gateway ./gateway
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- stage 2: a slim runtime with the wheel installed, as a non-root user ---------------
FROM ${PYTHON_IMAGE} AS runtime
# The uid/gid the Kubernetes manifests run as (config/k8s/deployment.yaml).
RUN groupadd --system --gid 10001 presence \
    && useradd --system --uid 10001 --gid presence --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin presence
COPY --from=build /wheels /wheels
RUN python -m venv /opt/presence \
    && /opt/presence/bin/python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
# Bound to every interface inside the container; flags (--host, --port, ...) and a TOML
# file (--config) still override these, as for any PRESENCE_* variable.
ENV PATH=/opt/presence/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PRESENCE_HOST=0.0.0.0 \
    PRESENCE_PORT=8765 \
    PRESENCE_ADMIN_HOST=0.0.0.0 \
    PRESENCE_ADMIN_PORT=9090
USER 10001:10001
EXPOSE 8765 9090
# Python, not curl: the slim image has no curl, and this adds nothing to it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PRESENCE_ADMIN_PORT', '9090') + '/healthz', timeout=2)"]
ENTRYPOINT ["presence", "serve"]
