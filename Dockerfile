# claude-code-api: the Claude Code agent as an HTTP service.
# The claude-agent-sdk wheel bundles the Claude Code CLI, so no Node.js is needed.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 app

WORKDIR /opt/claude-code-api
COPY pyproject.toml README.md ./
COPY claude_code_api ./claude_code_api
RUN pip install --no-cache-dir . \
    && mkdir -p /data /home/app/.claude \
    && chown app:app /data /home/app/.claude

# Claude's OAuth credentials live in ~/.claude; sessions and workspaces in /data.
ENV HOST=0.0.0.0 PORT=8080 DATA_DIR=/data
USER app
VOLUME ["/home/app/.claude", "/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"
# SIGTERM drains in-flight turns for SHUTDOWN_GRACE_S (default 30 s): give Docker longer.
STOPSIGNAL SIGTERM
CMD ["claude-code-api"]
