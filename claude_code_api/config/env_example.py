"""``.env.example``: every setting with its default and meaning, derived from the declarations.

The file compose.yaml reads (``env_file: .env``) starts as a copy of
``.env.example``. Like README's configuration table, it is generated from
:mod:`claude_code_api.config.settings`'s declarations, so it cannot forget a variable:
``python -m claude_code_api.config.env_example .env.example`` rewrites it, and a test
keeps the two equal. Every line is commented out, so a copy changes nothing
until the operator uncomments a line.

Besides the service's own settings it lists the credentials the Claude Code CLI
reads, and says what compose.yaml fixes in the container.
"""

from __future__ import annotations

import sys

from .settings import declarations, path_argument

HEADER = """\
# claude-code-api: the environment compose.yaml passes to the service (env_file: .env).
#   cp .env.example .env    then set API_KEYS, and a Claude login (README: Claude login).
# Every setting the service reads, with its default: uncomment a line to change it.
# Generated from claude_code_api/config/settings.py by `python -m claude_code_api.config.env_example
# .env.example`; a test keeps the two equal. Meanings in detail: README, Configuration.
"""

# What compose.yaml (or the image) does with a setting, where that differs from the default.
IN_THE_CONTAINER = {
    "PORT": "compose: the host port published; the container listens on 8080 whatever this says",
    "HOST": "compose: always 0.0.0.0 in the container",
    "DATA_DIR": "compose: always /data in the container (the agent-home volume)",
    "POOL_SIZE": "compose.prod.yaml: 2 unless set here",
    "MAX_LIVE_SESSIONS": "sizing: each live session is a ~190 MiB process (README: Production)",
    "CLAUDE_EXECUTABLE": "the image: the bundled CLI, also on PATH as `claude`",
    "SHUTDOWN_GRACE_S": "compose: 30 unless set here, below its stop_grace_period of 45s;"
    " the image alone: 5, so that a plain `docker stop` (10 s) answers every client",
}

TRAILER = """\
# --- Read by the Claude Code CLI (README: Claude login), not by the service ------------------
# An Anthropic API key for the agents; used only with USE_CLAUDE_API_KEY=1.
# ANTHROPIC_API_KEY=
# A long-lived OAuth token from `claude setup-token`; passed to the agents as it is.
# CLAUDE_CODE_OAUTH_TOKEN=
"""


def render() -> str:
    """The text of ``.env.example``."""
    parts = [HEADER]
    for _attribute, declared in declarations():
        lines = ["", f"# {declared.name}: {declared.doc}."]
        lines.append(f"#   accepts: {declared.kind.accepts()}")
        if declared.shown_default is not None:
            lines.append(f"#   default: {declared.shown_default}")
        if declared.name in IN_THE_CONTAINER:
            lines.append(f"#   {IN_THE_CONTAINER[declared.name]}")
        lines.append(f"# {declared.name}={declared.default}")
        parts.append("\n".join(lines) + "\n")
    parts.append("\n" + TRAILER)
    return "".join(parts)


USAGE = """usage: python -m claude_code_api.config.env_example .env.example
Writes .env.example (every setting, commented out, with its default and meaning) from the
declarations in claude_code_api/config/settings.py."""


def main(argv: list[str]) -> int:
    """Write ``argv[0]``; ``-h``/``--help`` print the usage; anything else is a usage error
    (exit 2), never a file named after a flag."""
    path = path_argument(argv, USAGE)
    if isinstance(path, int):
        return path
    try:
        path.write_text(render())
    except OSError as exc:
        print(f"python -m claude_code_api.config.env_example: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
