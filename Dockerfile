# claude-code-api: the Claude Code agent as an HTTP service (README: "Docker and compose").
#
# BASE: a Debian 12 (bookworm) image with python3 >= 3.11 and its venv module; the default is
# the official one. Where no image registry is reachable, build a base from the Debian archive
# (scripts/container-check does, with mmdebstrap) and pass --build-arg BASE=....
# Podman: build with --format docker, or the HEALTHCHECK and STOPSIGNAL below are dropped.
# Optional build secrets for pip, when the package index needs them (a proxy, a private index):
#   --secret id=pipconf,src=/etc/pip.conf --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE=python:3.11-slim-bookworm

# The dependencies named in pyproject.toml, as the cache key of the layer that installs them:
# a change to pyproject.toml that leaves them alone does not download them again (~180 MB).
FROM ${BASE} AS requirements
COPY pyproject.toml /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        >/requirements.txt

FROM ${BASE}
LABEL org.opencontainers.image.title="claude-code-api" \
      org.opencontainers.image.description="The Claude Code agent as an HTTP service"
SHELL ["/bin/sh", "-eu", "-c"]
# bubblewrap: each agent's sandbox; socat: the bridges out of its network namespace (to the
# service's model and egress proxies); tini: PID 1, reaps what agents' tools leave behind.
# (util-linux's setsid and ca-certificates come with the base.) Versions follow bookworm;
# the glob takes its security updates.
RUN apt-get update; \
    apt-get install --yes --no-install-recommends bubblewrap=0.8.* socat=1.7.* tini=0.19.*; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    groupadd --gid 1000 app; \
    useradd --uid 1000 --gid 1000 --no-log-init --home-dir /home/app --create-home \
        --shell /bin/sh app; \
    install -d -o 1000 -g 1000 -m 0700 /data /home/app/.claude /workspaces
# A virtualenv with the dependencies: pip may not install into Debian's own python3 (PEP 668).
# pip and setuptools leave it within the same layer; the bundled CLI goes on PATH as `claude`.
COPY --from=requirements /requirements.txt /tmp/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --requirement /tmp/requirements.txt; \
    /opt/venv/bin/pip uninstall --yes --quiet --disable-pip-version-check setuptools pip; \
    ln -s "$(/opt/venv/bin/python -c 'import claude_agent_sdk, os; print(os.path.dirname(claude_agent_sdk.__file__))')/_bundled/claude" \
        /opt/venv/bin/claude; \
    /opt/venv/bin/claude --version
# The service: its package on PYTHONPATH, compiled here (uid 1000 cannot write beside it).
COPY claude_code_api /opt/claude-code-api/claude_code_api
RUN /opt/venv/bin/python -m compileall -q /opt/claude-code-api

# uid 1000 as the original image's user, so its claude-auth volume stays readable.
# The real CLI refuses to run as root (unless IS_SANDBOX=1).
USER 1000:1000
WORKDIR /home/app
# SHUTDOWN_GRACE_S: running turns' time to finish after SIGTERM; then they are interrupted and
# answered with their partial output, and the service exits 0. 5 s, so that a plain
# `docker stop` (10 s before SIGKILL) answers every client; compose.yaml gives 30 s with a
# 45 s stop_grace_period.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/claude-code-api \
    PYTHONUNBUFFERED=1 \
    HOME=/home/app \
    HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/data \
    SHUTDOWN_GRACE_S=5 \
    TINI_SUBREAPER=1
# DATA_DIR: users' homes and workspaces, the session database. ~/.claude: the Claude login.
# /workspaces: WORKSPACES_DIR's mount point with several replicas (compose.replicas.yaml), so
# that a new volume there belongs to uid 1000; unused (and not a volume) otherwise.
VOLUME ["/data", "/home/app/.claude"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "claude_code_api.observe.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python3", "-m", "claude_code_api"]
