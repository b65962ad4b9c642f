"""claude-code-api: the Claude Code agent as an HTTP service, on trio."""

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
