"""Service configuration: read from the environment once, validated, frozen.

Every setting the service uses lives on :class:`Settings`. :func:`load_settings`
is the only place that reads ``os.environ`` for configuration, so a bad value is
reported once, at start-up, naming the variable and what it accepts
(:class:`ConfigError`); ``__main__`` turns that into exit status 2.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

import attrs


class ConfigError(ValueError):
    """A configuration variable holds a value the service cannot use."""


@attrs.frozen
class ApiKey:
    """One accepted API key and the user id it authenticates as."""

    key: str = attrs.field(repr=False)
    user_id: str


@attrs.frozen
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    pool_size: int = 1
    model: str = "claude-sonnet-4-6"
    api_keys: tuple[ApiKey, ...] = ()
    use_claude_api_key: bool = False
    # None: the SDK's bundled CLI.
    claude_executable: str | None = None
    queue_max: int = 20
    default_timeout_ms: int = 120_000
    max_timeout_ms: int = 3_600_000
    data_dir: Path = Path("data")
    # Seconds a CLI gets to start and answer `initialize` (the SDK alone waits 60 s).
    warmup_timeout_s: float = 30.0
    # Seconds between interrupting a timed-out turn and killing its process.
    interrupt_grace_s: float = 2.0
    # Largest request body accepted, in bytes.
    max_body_bytes: int = 1024 * 1024
    # Longest prompt accepted, in characters (the original's bound).
    max_prompt_chars: int = 200_000
    # Most characters of agent output kept for one reply; the rest is dropped and said so.
    max_output_chars: int = 1_000_000
    # On SIGTERM/SIGINT: seconds in-flight jobs get to finish before they are stopped.
    shutdown_grace_s: float = 30.0
    # Session agent processes running at once; beyond that the LRU idle one hibernates.
    max_live_sessions: int = 8
    # An idle session's process is closed (hibernated) after this many seconds.
    session_idle_s: float = 30 * 60.0
    # Turns of one session that may wait behind its running turn.
    session_queue_max: int = 10
    # Longest delay between restarts of a worker whose agent keeps failing to start.
    restart_backoff_max_s: float = 30.0

    def user_for_key(self, presented: str) -> str | None:
        """The user id for an API key, or None. Compares every key in constant time."""
        found = None
        candidate = presented.encode()
        for api_key in self.api_keys:
            if hmac.compare_digest(candidate, api_key.key.encode()):
                found = api_key.user_id
        return found


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: expected a whole number from {low} to {high}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def parse_api_keys(raw: str) -> tuple[ApiKey, ...]:
    """Parse ``API_KEYS``: comma-separated ``key`` (user "api") or ``prefix:key`` (user = prefix)."""
    keys = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        prefix, sep, key = entry.partition(":")
        if sep and prefix and key:
            keys.append(ApiKey(key=key, user_id=prefix))
        elif sep and not key:
            raise ConfigError(f"API_KEYS entry {prefix + ':'!r} has an empty key")
        else:
            keys.append(ApiKey(key=entry, user_id="api"))
    return tuple(keys)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting from ``env`` (default ``os.environ``).

    Raises :class:`ConfigError` naming the first bad variable.
    """
    env = os.environ if env is None else env
    max_timeout_ms = _int(env, "MAX_TIMEOUT_MS", 3_600_000, 1, 7 * 24 * 3_600_000)
    default_timeout_ms = _int(env, "DEFAULT_TIMEOUT_MS", 120_000, 1, 7 * 24 * 3_600_000)
    if default_timeout_ms > max_timeout_ms:
        raise ConfigError(
            f"DEFAULT_TIMEOUT_MS={default_timeout_ms}: must not exceed MAX_TIMEOUT_MS={max_timeout_ms}"
        )
    executable = env.get("CLAUDE_EXECUTABLE", "").strip() or None
    if executable is not None and not (
        os.path.isfile(executable) and os.access(executable, os.X_OK)
    ):
        raise ConfigError(
            f"CLAUDE_EXECUTABLE={executable!r}: expected the path of an executable file"
        )
    host = env.get("HOST", "").strip() or "0.0.0.0"
    model = env.get("CLAUDE_MODEL", "").strip() or "claude-sonnet-4-6"
    return Settings(
        host=host,
        port=_int(env, "PORT", 8080, 0, 65535),
        pool_size=_int(env, "POOL_SIZE", 1, 1, 256),
        model=model,
        api_keys=parse_api_keys(env.get("API_KEYS", "")),
        use_claude_api_key=_flag(env, "USE_CLAUDE_API_KEY"),
        claude_executable=executable,
        queue_max=_int(env, "QUEUE_MAX", 20, 0, 100_000),
        default_timeout_ms=default_timeout_ms,
        max_timeout_ms=max_timeout_ms,
        data_dir=Path(env.get("DATA_DIR", "").strip() or "data"),
        warmup_timeout_s=_int(env, "WARMUP_TIMEOUT_MS", 30_000, 100, 600_000) / 1000,
        interrupt_grace_s=_int(env, "INTERRUPT_GRACE_MS", 2_000, 0, 600_000) / 1000,
        shutdown_grace_s=_int(env, "SHUTDOWN_GRACE_S", 30, 0, 3600),
        max_output_chars=_int(env, "MAX_OUTPUT_CHARS", 1_000_000, 1, 100_000_000),
        max_live_sessions=_int(env, "MAX_LIVE_SESSIONS", 8, 1, 10_000),
        session_idle_s=_int(env, "SESSION_IDLE_MS", 30 * 60_000, 1, 30 * 24 * 3_600_000) / 1000,
        session_queue_max=_int(env, "SESSION_QUEUE_MAX", 10, 0, 10_000),
        restart_backoff_max_s=_int(env, "RESTART_BACKOFF_MAX_MS", 30_000, 1, 3_600_000) / 1000,
    )
