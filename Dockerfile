# syntax=docker/dockerfile:1
#
# Image of the mdr-connector service. The build stage installs the package
# with the exact versions of constraints.txt into a virtual environment, and
# the runtime stage receives only that environment. With those versions every
# dependency has a wheel for linux/amd64 and linux/arm64, so neither stage
# needs a compiler.
#
# At run time the process writes only to /data (the token files, the lock
# files, the attachment spool, SQLite when no database_url is set) and to
# /tmp, so the root file system can be read-only: `docker run --read-only
# --tmpfs /tmp ...`, or `read_only: true` in docker-compose.yml.
#
#   docker build -t mdr-connector .
#   docker run --rm mdr-connector --help

# Pin a digest here (python:3.11-slim@sha256:...) for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim


FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY connector ./connector
COPY adapters ./adapters
COPY mappings ./mappings
COPY migrations ./migrations

# pip and setuptools are needed only to install, so they are removed from the
# environment that the runtime stage copies.
RUN python -m venv /opt/mdr-connector \
    && /opt/mdr-connector/bin/pip install --constraint constraints.txt ".[postgres]" \
    && /opt/mdr-connector/bin/pip uninstall --yes pip setuptools \
    && /opt/mdr-connector/bin/mdr-connector --help > /dev/null


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="mdr-connector" \
      org.opencontainers.image.description="Two-way sync between Kaspersky MDR incidents and Jira" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image keeps pip, setuptools and wheel for the system Python. The
# service needs none of them at run time.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel

# A fixed uid and gid, so that volumes, secret files and a Kubernetes
# runAsUser can name the owner. /data/tokens has mode 0700, and the connector
# rejects a token folder that group or others can write.
RUN groupadd --system --gid 10001 mdr-connector \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin mdr-connector \
    && install --directory --owner=10001 --group=10001 --mode=0700 /data /data/tokens \
    && install --directory --owner=root --group=root --mode=0755 /etc/mdr-connector

COPY --from=build /opt/mdr-connector /opt/mdr-connector

# The installer compiled every module, so Python need not write bytecode at run time.
ENV PATH=/opt/mdr-connector/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MDR_CONNECTOR_CONFIG=/etc/mdr-connector/config.yaml

RUN mdr-connector --help > /dev/null

USER 10001:10001
WORKDIR /data
# A new named volume copies the owner and mode of these folders from the image.
# The token folder is a volume of its own, so it can be backed up and access-
# controlled apart from the rest of /data.
VOLUME ["/data", "/data/tokens"]

# No HEALTHCHECK here: /healthz listens on the port the config names
# (observability.port), which the image cannot know. docker-compose.yml
# declares the check for the port its config sets.
ENTRYPOINT ["mdr-connector"]
CMD ["run"]
