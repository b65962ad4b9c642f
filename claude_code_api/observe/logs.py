"""Logging set-up: one format for every line the process writes.

``LOG_FORMAT=text`` (the default) writes ``time level logger: message``;
``LOG_FORMAT=json`` writes each record as one JSON object with ``time``,
``level``, ``logger`` and ``message``, plus the context fields a record carries
(``runId``, ``userId``, ``sessionId``, ``worker``: pass them with
``extra=...``) and ``exception`` with the traceback when there is one. Python's
warnings go through logging too (``py.warnings``), and so does hypercorn's
access log (``hypercorn.access``), so nothing bypasses the format.

What is never logged — API keys, tokens, OAuth codes and verifiers, the
NEXTAUTH secret, prompts' contents (their length is fine) — is the callers'
discipline; a test greps a run's whole output for them.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

# Fields a record may carry (via ``extra=``) that the JSON format writes out.
CONTEXT_FIELDS = ("runId", "userId", "sessionId", "worker")
# Hypercorn's access log line: no headers (a key could be in one), no query string.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss'


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO", format: str = "text") -> None:
    """Route every log record (warnings included) to stderr in ``format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
