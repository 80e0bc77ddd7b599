# MLflow's tracking server on a cluster (manifests/base/mlflow.yaml): mlflow[auth] (the basic-auth
# app), psycopg2-binary (PostgreSQL) and google-cloud-storage (the artifact proxy to GCS), nothing
# else: no TensorFlow, no bloodcell. Their versions are the pins of pyproject.toml, the whole tree
# locked by constraints.txt. Build with the classic builder or BuildKit, context = the repository root:
#   make image-mlflow [BASE_IMAGE=...] [PIP_CA=/path/ca.pem]
# BASE_IMAGE is any Debian-based image with python3 (3.11 or 3.12), its venv module and ca-certificates.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The three requirements, as pinned in pyproject.toml's dependencies.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import re, tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
wanted = {'mlflow', 'psycopg2-binary', 'google-cloud-storage'}; \
found = [d for d in deps if re.split(r'[\[=<>~!; ]', d, maxsplit=1)[0].lower() in wanted]; \
assert len(found) == len(wanted) and any(d.startswith('mlflow[auth]') for d in found), found; \
print(*found, sep='\n')" > /requirements.txt

# The server in a virtual environment, from the lock. A custom CA (make image-mlflow PIP_CA=...) is
# trusted in this build stage only: the final image copies the environment and nothing else.
FROM ${BASE_IMAGE} AS dependencies
COPY docker/ca/ /usr/local/share/ca-certificates/bloodcell/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY constraints.txt /opt/venv-lock/
COPY --from=requirements /requirements.txt /opt/venv-lock/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet --upgrade "pip>=24" \
    && /opt/venv/bin/pip install --quiet -c /opt/venv-lock/constraints.txt -r /opt/venv-lock/requirements.txt \
    && cp /opt/venv-lock/constraints.txt /opt/venv/constraints.txt

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="bloodcell-mlflow" \
      org.opencontainers.image.description="MLflow tracking server for bloodcell (basic-auth, PostgreSQL, GCS)" \
      org.opencontainers.image.source="https://github.com/bloodcell/bloodcell" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --no-log-init --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mlflow
COPY --from=dependencies /opt/venv /opt/venv
RUN /opt/venv/bin/python -c "import mlflow.server.auth, flask_wtf, psycopg2, google.cloud.storage"
# Only the web server: no job runner and no huey consumers (they would multiply its memory).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
# For Docker alone (Kubernetes uses the Deployment's probes): /health needs no login.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
