"""Service configuration: declared once, read from the environment once, validated, frozen.

Each setting is declared exactly once, as a field of :class:`Settings` made by
:func:`setting`: the environment variable's name, what it accepts (a *kind*:
type, unit, bounds), its default as one would write it in the environment, and
a one-line doc. Everything else is derived from those declarations:

* :func:`load_settings` parses and validates the environment, field by field;
* ``Settings()`` holds the defaults, each parsed from its declared text by the
  same kind, so a default obeys the same bounds as a value from the environment;
* :func:`markdown_table` renders README's configuration table, which a test
  keeps equal to the declarations (``python -m claude_code_api.config README.md``
  rewrites it).

Units: the environment keeps the names and units of exitxio/claude-code-api
(``DEFAULT_TIMEOUT_MS`` in milliseconds, ``SHUTDOWN_GRACE_S`` in seconds); on
:class:`Settings` every duration is a float number of seconds named ``*_s``.

Error handling: :func:`load_settings` is the only place that reads
``os.environ`` for configuration, so a bad value is reported once, at start-up,
as a one-line :class:`ConfigError` naming the variable and what it accepts;
``__main__`` turns that into exit status 2. The message quotes the value,
except for secrets (``API_KEYS``, ``NEXTAUTH_SECRET``).
"""

from __future__ import annotations

import hmac
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from ..messages import PERMISSION_MODES


class ConfigError(ValueError):
    """A configuration variable holds a value the service cannot use."""


@attrs.frozen
class ApiKey:
    """One accepted API key and the user id it authenticates as."""

    key: str = attrs.field(repr=False)
    user_id: str


# --- kinds: what one variable accepts ----------------------------------------------------------


class Kind(Protocol):
    """What one variable accepts.

    ``parse`` gets the variable's text, stripped and not blank (a blank variable
    takes the default; only a declared default may be ``""``), and returns the
    value :class:`Settings` holds; it raises ``ValueError("expected ...")`` for
    text it refuses. ``accepts`` says what it accepts, for README's table.
    """

    def parse(self, raw: str) -> Any: ...

    def accepts(self) -> str: ...


def _whole_number(raw: str, low: int, high: int) -> int | None:
    """``raw`` as a decimal integer within ``[low, high]``, or None."""
    try:
        value = int(raw, 10)
    except ValueError:
        return None
    return value if low <= value <= high else None


@attrs.frozen
class Whole:
    """A whole number from ``low`` to ``high``."""

    low: int
    high: int

    def parse(self, raw: str) -> int:
        value = _whole_number(raw, self.low, self.high)
        if value is None:
            raise ValueError(f"expected a whole number from {self.low} to {self.high}")
        return value

    def accepts(self) -> str:
        return f"{self.low}–{self.high}"


_SECONDS_PER = {"ms": 1000, "s": 1}
_UNIT_WORDS = {"ms": "milliseconds", "s": "seconds"}


@attrs.frozen
class Duration:
    """A whole number of ``unit`` (``"ms"`` or ``"s"``) in the environment, float seconds
    on :class:`Settings`. With ``zero_is_never``, 0 means "never" and becomes None."""

    unit: str
    low: int
    high: int
    zero_is_never: bool = False

    def parse(self, raw: str) -> float | None:
        count = _whole_number(raw, self.low, self.high)
        if count is None:
            never = " (0: never)" if self.zero_is_never else ""
            raise ValueError(
                f"expected a whole number of {_UNIT_WORDS[self.unit]} "
                f"from {self.low} to {self.high}{never}"
            )
        if count == 0 and self.zero_is_never:
            return None
        return count / _SECONDS_PER[self.unit]

    def accepts(self) -> str:
        never = " (0: never)" if self.zero_is_never else ""
        return f"{self.unit}, {self.low}–{self.high}{never}"


@attrs.frozen
class Flag:
    """On or off."""

    def parse(self, raw: str) -> bool:
        word = raw.lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected 1/true/yes/on or 0/false/no/off")

    def accepts(self) -> str:
        return "`1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`"


@attrs.frozen
class Choice:
    """One of ``options``, in any letter case; held as written in ``options``."""

    options: tuple[str, ...]

    def parse(self, raw: str) -> str:
        for option in self.options:
            if raw.lower() == option.lower():
                return option
        raise ValueError(f"expected one of {', '.join(self.options)}")

    def accepts(self) -> str:
        return ", ".join(f"`{option}`" for option in self.options)


@attrs.frozen
class Text:
    """Printable text: no control characters, and no undecodable bytes (which
    ``os.environ`` holds as surrogate escapes and which fail later, far from here)."""

    what: str

    def parse(self, raw: str) -> str:
        if not raw.isprintable():
            raise ValueError(f"expected {self.what} in printable characters")
        return raw

    def accepts(self) -> str:
        return self.what


@attrs.frozen
class OrUnset:
    """What ``kind`` accepts; a blank value (only the declared default may be) gives None,
    and the setting then follows another one, as its doc says."""

    kind: Kind

    def parse(self, raw: str) -> Any:
        return None if not raw else self.kind.parse(raw)

    def accepts(self) -> str:
        return self.kind.accepts()


@attrs.frozen
class Directory:
    """A directory path."""

    def parse(self, raw: str) -> Path:
        return Path(raw)

    def accepts(self) -> str:
        return "a directory path"


@attrs.frozen
class Executable:
    """The path of an executable file. Only a blank value (the default) gives None."""

    def parse(self, raw: str) -> str | None:
        if not raw:
            return None
        if not (os.path.isfile(raw) and os.access(raw, os.X_OK)):
            raise ValueError("expected the path of an executable file")
        return raw

    def accepts(self) -> str:
        return "the path of an executable file"


# A key or user id travels in an HTTP header, so it is visible ASCII (no space, no control
# character, nothing outside ASCII, no undecodable byte: os.environ holds those as surrogate
# escapes); ',' separates entries and the first ':' separates the user id from the key.
_KEY_TEXT = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_USER_TEXT = re.compile(r"[\x21-\x2b\x2d-\x39\x3b-\x7e]+")


@attrs.frozen
class ApiKeys:
    """``API_KEYS``: comma-separated ``key`` (user id ``api``) or ``user:key`` entries.

    Refuses (naming the entry by position, never quoting a key): an empty user id
    or key, a character outside visible ASCII or a ',' in a key (':' too in a user
    id), and one key given to two different users. Blank entries are skipped; a key
    listed twice for the same user is kept once.
    """

    def parse(self, raw: str) -> tuple[ApiKey, ...]:
        keys: dict[str, ApiKey] = {}
        where: dict[str, int] = {}
        for number, entry in enumerate((part.strip() for part in raw.split(",")), 1):
            if not entry:
                continue
            user_id, sep, key = entry.partition(":")
            if not sep:
                user_id, key = "api", entry
            elif not user_id:
                raise ValueError(f"entry {number}: the user id before ':' is empty")
            elif not _USER_TEXT.fullmatch(user_id):
                raise ValueError(
                    f"entry {number}: a user id may only hold visible ASCII characters"
                    " other than ',' and ':'"
                )
            who = f"entry {number} (user {user_id!r})"
            if not key:
                raise ValueError(f"{who}: the key after ':' is empty")
            if not _KEY_TEXT.fullmatch(key):
                raise ValueError(
                    f"{who}: a key may only hold visible ASCII characters other than ','"
                )
            earlier = keys.get(key)
            if earlier is not None and earlier.user_id != user_id:
                raise ValueError(
                    f"entries {where[key]} and {number} give one key to two users"
                    f" ({earlier.user_id!r} and {user_id!r})"
                )
            if earlier is None:
                keys[key] = ApiKey(key=key, user_id=user_id)
                where[key] = number
        return tuple(keys.values())

    def accepts(self) -> str:
        return "comma-separated `key` or `user:key` (see Auth)"


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A host name (letters, digits, "-", dot-separated) or an IPv4/IPv6 address.
_HOST_PATTERN = re.compile(
    r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|[0-9a-f:.]*:[0-9a-f:.]*"
)
# Handed to an agent, API_KEYS would show every user's key, and NEXTAUTH_SECRET would let it
# sign tokens for any user.
SERVICE_SECRETS = ("API_KEYS", "NEXTAUTH_SECRET")


@attrs.frozen
class EnvNames:
    """Comma-separated environment variable names; blank entries skipped, repeats kept once.
    The service's secrets (:data:`SERVICE_SECRETS`) are refused."""

    def parse(self, raw: str) -> tuple[str, ...]:
        names: list[str] = []
        for entry in (part.strip() for part in raw.split(",")):
            if not entry:
                continue
            if not _ENV_NAME.fullmatch(entry):
                raise ValueError(f"{entry!r} is not a variable name (letters, digits, '_')")
            if entry in SERVICE_SECRETS:
                raise ValueError(f"{entry} is the service's secret, never an agent's")
            if entry not in names:
                names.append(entry)
        return tuple(names)

    def accepts(self) -> str:
        return "comma-separated variable names"


@attrs.frozen
class HostPatterns:
    """Comma-separated host patterns: ``*`` (any host), ``*.example.com`` (its subdomains, at any
    depth), or a host name or IP address matched exactly; case-insensitive, blank entries
    skipped, repeats kept once."""

    def parse(self, raw: str) -> tuple[str, ...]:
        patterns: list[str] = []
        for entry in (part.strip().lower() for part in raw.split(",")):
            if entry.endswith(".") and entry != "*.":  # (a fully qualified name)
                entry = entry[:-1]
            if not entry:
                continue
            name = entry[2:] if entry.startswith("*.") else entry
            if entry != "*" and not _HOST_PATTERN.fullmatch(name):
                raise ValueError(
                    f"{entry!r} is not a host pattern (`*`, `*.example.com`, `example.com`)"
                )
            if entry not in patterns:
                patterns.append(entry)
        return tuple(patterns)

    def accepts(self) -> str:
        return "comma-separated host patterns"


@attrs.frozen
class Number:
    """A decimal number greater than ``above`` and at most ``high``."""

    above: float
    high: float

    def parse(self, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (self.above < value <= self.high):  # NaN fails too
            raise ValueError(f"expected a number above {self.above:g}, at most {self.high:g}")
        return value

    def accepts(self) -> str:
        return f"a number > {self.above:g}, ≤ {self.high:g}"


@attrs.frozen
class Names:
    """Comma-separated ``what``s (printable, no spaces); blank entries skipped, repeats kept
    once. With ``options``, each must be one of them (held as written there)."""

    what: str
    options: tuple[str, ...] = ()

    def parse(self, raw: str) -> tuple[str, ...]:
        names: list[str] = []
        for entry in (part.strip() for part in raw.split(",")):
            if not entry:
                continue
            if self.options:
                entry = Choice(self.options).parse(entry)
            elif not entry.isprintable() or " " in entry:
                raise ValueError(f"{entry!r} is not a {self.what} (printable, no spaces)")
            if entry not in names:
                names.append(entry)
        if not names:
            raise ValueError(f"expected at least one {self.what}")
        return tuple(names)

    def accepts(self) -> str:
        if self.options:
            return "comma-separated: " + ", ".join(f"`{option}`" for option in self.options)
        return f"comma-separated {self.what}s"


@attrs.frozen
class UserIds:
    """Comma-separated user ids (as keys and tokens authenticate them); blank entries skipped.

    A token's user id may hold ':' and spaces, so only ',' separates; each entry is
    stripped and must be printable. Text that names nobody (``","``) is refused, since
    it would read as "unset", which lets everyone in.
    """

    def parse(self, raw: str) -> frozenset[str]:
        users = set()
        for entry in (part.strip() for part in raw.split(",")):
            if not entry:
                continue
            if not entry.isprintable():
                raise ValueError("expected user ids in printable characters")
            users.add(entry)
        if raw and not users:
            raise ValueError("expected at least one user id")
        return frozenset(users)

    def accepts(self) -> str:
        return "comma-separated user ids"


@attrs.frozen
class Url:
    """An ``http://`` or ``https://`` URL with a host."""

    def parse(self, raw: str) -> str:
        try:
            parts = urlsplit(raw)
            scheme, host = parts.scheme, parts.hostname
        except ValueError:  # e.g. an unclosed "[" of an IPv6 address
            scheme, host = "", None
        if not raw.isprintable() or scheme not in ("http", "https") or not host:
            raise ValueError("expected an http:// or https:// URL")
        return raw

    def accepts(self) -> str:
        return "an `http(s)://` URL"


@attrs.frozen
class PostgresUrl:
    """A PostgreSQL connection URL, as libpq reads it. Only a blank value (the default)
    gives None. Checked for its scheme only: libpq says the rest at start-up."""

    def parse(self, raw: str) -> str | None:
        if not raw:
            return None
        try:
            scheme = urlsplit(raw).scheme
        except ValueError:  # e.g. an unclosed "[" of an IPv6 address
            scheme = ""
        if not raw.isprintable() or scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a postgresql:// URL")
        return raw

    def accepts(self) -> str:
        return "a `postgresql://` URL"


# --- the declarations ----------------------------------------------------------------------------


@attrs.frozen
class EnvVar:
    """One setting's declaration: where it comes from and what it means."""

    name: str
    kind: Kind
    # The default as written in the environment ("" for none).
    default: str
    doc: str
    # README's Default column when the text alone says too little.
    shown_default: str | None = None
    # Never quote the value in an error message.
    secret: bool = False


_DECLARATION = "claude_code_api.env_var"


def setting(
    name: str,
    kind: Kind,
    default: str,
    doc: str,
    *,
    shown_default: str | None = None,
    secret: bool = False,
    repr: bool = True,
) -> Any:
    """Declare a :class:`Settings` field read from the environment variable ``name``.

    ``repr=False`` keeps a secret value out of ``repr(settings)``."""
    declaration = EnvVar(name, kind, default, doc, shown_default, secret)
    return attrs.field(default=kind.parse(default), metadata={_DECLARATION: declaration}, repr=repr)


DAY_MS = 24 * 3_600_000
# What one image adds to a request body besides its base64 (a data: URL's prefix, its
# JSON object and field names).
IMAGE_OVERHEAD_BYTES = 256


@attrs.frozen
class Settings:
    """Every setting the service uses. Build it with :func:`load_settings`;
    ``Settings()`` is the defaults (what ``load_settings({})`` returns)."""

    port: int = setting("PORT", Whole(0, 65535), "8080", "port to listen on; `0`: any free port")
    host: str = setting("HOST", Text("an address"), "0.0.0.0", "address to listen on")
    api_keys: tuple[ApiKey, ...] = setting(
        "API_KEYS", ApiKeys(), "", "API keys and the user each one authenticates as", secret=True
    )
    nextauth_secret: str = setting(
        "NEXTAUTH_SECRET",
        Text("a secret"),
        "",
        "claude-code-web's `NEXTAUTH_SECRET`: `Authorization: Bearer` accepts the tokens it"
        " signs (see Auth); unset: tokens are refused",
        secret=True,
        repr=False,
    )
    token_user_prefix: str = setting(
        "TOKEN_USER_PREFIX",
        Text("text"),
        "",
        "put before a token's username to make its user id (`web:` makes `alice` `web:alice`);"
        " unset: token users and `user:key` users share one namespace",
    )
    auth_admins: frozenset[str] = setting(
        "AUTH_ADMINS",
        UserIds(),
        "",
        "user ids allowed to log the service in to Claude (`/auth/login`, `/auth/exchange`);"
        " unset: every authenticated caller",
        shown_default="everyone",
    )
    pool_size: int = setting(
        "POOL_SIZE", Whole(1, 256), "1", "pre-warmed agent processes for one-shot requests"
    )
    agent_reuse_s: float = setting(
        "AGENT_REUSE_S",
        Duration("s", 0, 3600),
        "5",
        "after a one-shot request, its agent is kept this long for the same user's next one"
        " (cleared and its files removed first; never for another user), if their previous"
        " one came within it too; `0`: every request gets a fresh agent",
    )
    # None: POOL_SIZE (see kept_agents_max).
    agent_reuse_max: int | None = setting(
        "AGENT_REUSE_MAX",
        OrUnset(Whole(0, 256)),
        "",
        "agents kept for their users' next one-shot (`AGENT_REUSE_S`) at most, beyond the"
        " `POOL_SIZE` warm ones kept ready for anyone (each a process of ~190 MiB); past"
        " it the longest unused is retired; `0`: none is kept",
        shown_default="`POOL_SIZE`",
    )
    agent_warm_up_turn: bool = setting(
        "AGENT_WARM_UP_TURN",
        Flag(),
        "on",
        "on: a pool agent runs one turn before it is offered, answered by the service itself"
        " (no model call, nothing counted), its exchange kept before the request's prompt:"
        " the CLI's first-turn work (~0.1 s) is not on a request's time; off: a request's turn"
        " is its agent's first",
    )
    model: str = setting(
        "CLAUDE_MODEL",
        Text("a model name"),
        "claude-sonnet-4-6",
        "model the agents use when a request names none",
    )
    # None: only CLAUDE_MODEL (see allowed_models).
    allowed_models_setting: tuple[str, ...] | None = setting(
        "ALLOWED_MODELS",
        OrUnset(Names("model name")),
        "",
        "models a request may name (`model`); `CLAUDE_MODEL` always may be",
        shown_default="`CLAUDE_MODEL`",
    )
    # None: no limit.
    max_turns_limit: int | None = setting(
        "MAX_TURNS_LIMIT",
        OrUnset(Whole(1, 1_000_000)),
        "",
        "largest `maxTurns` a request may ask for",
        shown_default="no limit",
    )
    # None: no limit.
    max_budget_usd_limit: float | None = setting(
        "MAX_BUDGET_USD_LIMIT",
        OrUnset(Number(0, 1_000_000)),
        "",
        "largest `maxBudgetUsd` a request may ask for",
        shown_default="no limit",
    )
    # None: no budget.
    user_daily_budget_usd: float | None = setting(
        "USER_DAILY_BUDGET_USD",
        OrUnset(Number(0, 1_000_000)),
        "",
        "what one user id may spend on the model per calendar day (UTC), in US dollars, as the"
        " model proxy counts it; past it, new work is refused (429)"
        " and running turns end at their next model call",
        shown_default="no budget",
    )
    allowed_permission_modes: tuple[str, ...] = setting(
        "ALLOWED_PERMISSION_MODES",
        Names("permission mode", PERMISSION_MODES),
        "default,acceptEdits,plan,dontAsk,auto",
        "permission modes a request may ask for (`permissionMode`); a request that asks"
        " for none runs with `bypassPermissions`, as every request always has",
        shown_default="all but `bypassPermissions`",
    )
    use_claude_api_key: bool = setting(
        "USE_CLAUDE_API_KEY",
        Flag(),
        "off",
        "on: the model proxy calls the model API with `ANTHROPIC_API_KEY` (or"
        " `ANTHROPIC_AUTH_TOKEN`); off: with the Claude login. Agents hold neither: a token"
        " of their own",
    )
    claude_oauth_token_url: str = setting(
        "CLAUDE_OAUTH_TOKEN_URL",
        Url(),
        "https://platform.claude.com/v1/oauth/token",
        "Claude's OAuth token endpoint, for `/auth/exchange` and refreshing the login",
    )
    oauth_refresh_margin_s: float = setting(
        "OAUTH_REFRESH_MARGIN_S",
        Duration("s", 30, 86_400),
        "300",
        "the OAuth access token is refreshed when less than this remains of it (at the"
        " latest halfway through its life)",
    )
    claude_executable: str | None = setting(
        "CLAUDE_EXECUTABLE",
        Executable(),
        "",
        "the `claude` the agents run",
        shown_default="the SDK's bundled CLI",
    )
    queue_max: int = setting(
        "QUEUE_MAX", Whole(0, 100_000), "20", "jobs that may wait for a worker"
    )
    # None: QUEUE_MAX (see user_queue_max).
    queue_max_per_user: int | None = setting(
        "QUEUE_MAX_PER_USER",
        OrUnset(Whole(0, 100_000)),
        "",
        "jobs one user may have waiting for a worker (and sessions waiting for a live slot);"
        " past it that user gets 429 while others are served",
        shown_default="`QUEUE_MAX`",
    )
    # None: one less than the larger of POOL_SIZE and MAX_LIVE_SESSIONS (see running_per_user_max).
    max_running_per_user: int | None = setting(
        "MAX_RUNNING_PER_USER",
        OrUnset(Whole(1, 100_000)),
        "",
        "one-shot jobs and session turns one user may have running at once, counted"
        " together; more of that user's work waits in their line (as queued work does,"
        " under `QUEUE_MAX_PER_USER` and its deadline) while other users' work runs",
        shown_default="the larger of `POOL_SIZE` and `MAX_LIVE_SESSIONS`, less 1 (at least 1)",
    )
    default_timeout_s: float = setting(
        "DEFAULT_TIMEOUT_MS",
        Duration("ms", 1, 7 * DAY_MS),
        "120000",
        "a request's `timeoutMs` when it gives none; at most `MAX_TIMEOUT_MS`",
    )
    max_timeout_s: float = setting(
        "MAX_TIMEOUT_MS",
        Duration("ms", 1, 7 * DAY_MS),
        "3600000",
        "largest `timeoutMs` accepted",
    )
    data_dir: Path = setting(
        "DATA_DIR",
        Directory(),
        "data",
        "workspaces, user directories and the session database; a local filesystem",
    )
    workspaces_dir: Path | None = setting(
        "WORKSPACES_DIR",
        OrUnset(Directory()),
        "",
        "where users' workspaces are (their agents' working directories, what `/files`"
        " serves): `<WORKSPACES_DIR>/<name>` for each user; with several replicas, a volume"
        " every replica mounts at this same path (a session's transcripts name it)",
        shown_default="`DATA_DIR`/users/<name>/workspace",
    )
    # A password may be in it: never quoted, never in repr(settings).
    database_url: str | None = setting(
        "DATABASE_URL",
        PostgresUrl(),
        "",
        "PostgreSQL for the state several replicas share (`postgresql://user:password@host/db`):"
        " the session records go to its table `sessions` instead of `DATA_DIR`'s"
        " `sessions.sqlite3`, and each session turn's transcript is copied there before the"
        " turn is answered (a session resumes on any replica); the Claude login and pending"
        " `/auth/login`s are kept there too (its tokens: protect the database as the"
        " credentials file); unset: none, only `DATA_DIR`",
        shown_default="none",
        secret=True,
        repr=False,
    )
    session_lease_s: float = setting(
        "SESSION_LEASE_S",
        Duration("s", 3, 600),
        "15",
        "with `DATABASE_URL`: a live session's lease in the database, renewed every third of"
        " this; a replica that dies holds its sessions no longer than this, after which any"
        " replica serves them (a live replica hands a session over when another asks for it)",
    )
    max_live_sessions: int = setting(
        "MAX_LIVE_SESSIONS", Whole(1, 10_000), "8", "session processes running at once"
    )
    session_idle_s: float = setting(
        "SESSION_IDLE_MS",
        Duration("ms", 1, 30 * DAY_MS),
        "1800000",
        "an idle session hibernates (its process closes) after this",
    )
    session_queue_max: int = setting(
        "SESSION_QUEUE_MAX",
        Whole(0, 10_000),
        "10",
        "turns that may wait behind a session's running turn",
    )
    max_sessions_per_user: int = setting(
        "MAX_SESSIONS_PER_USER",
        Whole(1, 1_000_000),
        "100",
        "sessions one user keeps, live or hibernated; a new session past it drops that user's"
        " least recently used hibernated session (429 only if all are live)",
    )
    # None: sessions never expire.
    session_ttl_s: float | None = setting(
        "SESSION_TTL_MS",
        Duration("ms", 0, 3650 * DAY_MS, zero_is_never=True),
        "2592000000",
        "a session not used for this long is deleted with its transcripts; must exceed"
        " `SESSION_IDLE_MS` + `MAX_TIMEOUT_MS` (so no live session expires)",
    )
    user_disk_max_mb: int = setting(
        "USER_DISK_MAX_MB",
        Whole(1, 100_000_000),
        "1024",
        "MiB one user's agents may keep (their HOME with workspace and transcripts, and"
        " their one-shot agents' HOMEs while they run); over it new work answers 507 and a"
        " running turn is stopped; no single file may grow past it",
    )
    disk_reserve_mb: int = setting(
        "DISK_RESERVE_MB",
        Whole(0, 100_000_000),
        "256",
        "MiB of `DATA_DIR`'s filesystem (at most a quarter of it) kept for the service's"
        " own state, held by the file `DATA_DIR/.reserve`: agents can fill only the rest; a"
        " quarter of it is released when they have; `0`: no reserve",
    )
    max_images: int = setting(
        "MAX_IMAGES",
        Whole(0, 100),
        "4",
        "images one request may carry (`images` of `/run`, the image parts of"
        " `/v1/chat/completions` and `/v1/messages`, every message counted); `0`: none"
        " (the request body limit grows with it: see Images)",
    )
    max_image_bytes: int = setting(
        "MAX_IMAGE_BYTES",
        Whole(1, 100_000_000),
        "5242880",
        "bytes one image may have (decoded, not base64); the default is the Messages API's"
        " own limit, 5 MiB",
    )
    max_file_bytes: int = setting(
        "MAX_FILE_BYTES",
        Whole(1, 100_000_000_000),
        "26214400",
        "bytes one file written with `PUT /files/{path}` may have (it counts toward"
        " `USER_DISK_MAX_MB` too)",
    )
    restart_backoff_max_s: float = setting(
        "RESTART_BACKOFF_MAX_MS",
        Duration("ms", 1, 3_600_000),
        "30000",
        "cap of the exponential backoff between restarts in a crash loop",
    )
    warmup_timeout_s: float = setting(
        "WARMUP_TIMEOUT_MS",
        Duration("ms", 100, 600_000),
        "30000",
        "an agent that has not started and answered `initialize` by then is killed and"
        " counted as a failure",
    )
    interrupt_grace_s: float = setting(
        "INTERRUPT_GRACE_MS",
        Duration("ms", 0, 600_000),
        "2000",
        "a timed-out or abandoned turn's time to stop after an interrupt, before its"
        " process is killed",
    )
    shutdown_grace_s: float = setting(
        "SHUTDOWN_GRACE_S",
        Duration("s", 0, 3600),
        "30",
        "on SIGTERM/SIGINT, time for running turns to finish; a second signal skips it",
    )
    max_output_chars: int = setting(
        "MAX_OUTPUT_CHARS",
        Whole(1, 100_000_000),
        "1000000",
        "characters of agent output kept for one reply; the rest is dropped and said so",
    )
    agent_env: tuple[str, ...] = setting(
        "AGENT_ENV",
        EnvNames(),
        "",
        "extra environment variables passed on to agent processes",
    )
    agent_sandbox: str = setting(
        "AGENT_SANDBOX",
        Choice(("auto", "on", "off")),
        "auto",
        "run each agent in an OS sandbox (bubblewrap) that hides other users' data and the"
        " service's secrets; `on` fails start-up when it cannot be had, `auto` uses it when"
        " it can",
    )
    agent_egress: tuple[str, ...] = setting(
        "AGENT_EGRESS",
        HostPatterns(),
        "",
        "hosts a sandboxed agent's tools may reach, through the service's egress proxy"
        " (`*.pypi.org,github.com`; `*`: anywhere but the host itself); unset: none (the"
        " model API is reached through the model proxy). See Security model",
        shown_default="none",
    )
    agent_uid: int = setting(
        "AGENT_UID",
        Whole(1, 4_294_967_294),
        "65536",
        "when the service runs as root, the OS user (uid, and a group of the same number)"
        " its agents run as, never root; no account of the host should use it. Otherwise"
        " agents run as the service's user",
    )
    # None: RAM/16, at most 1024 (agent_limits.default_tmp_mb).
    agent_tmp_mb: int | None = setting(
        "AGENT_TMP_MB",
        OrUnset(Whole(1, 1_048_576)),
        "",
        "size in MiB of each writable tmpfs in an agent's sandbox (`/tmp`, `/dev/shm`): what"
        " an agent writes there is held in RAM until it ends",
        shown_default="RAM/16, at most 1024",
    )
    agent_memory_mb: int = setting(
        "AGENT_MEMORY_MB",
        Whole(128, 1_048_576),
        "2048",
        "memory limit of one agent (the CLI, ~200 MiB, its tools, its tmpfs files), in MiB:"
        " an agent that passes it is killed and its request answered 502; needs cgroups",
    )
    agent_max_procs: int = setting(
        "AGENT_MAX_PROCS",
        Whole(16, 1_000_000),
        "512",
        "most processes and threads one agent may hold at once (a pids cgroup; else"
        " `RLIMIT_NPROC` in its sandbox's user namespace); a fork past it fails",
    )
    log_level: str = setting(
        "LOG_LEVEL",
        Choice(("DEBUG", "INFO", "WARNING", "ERROR")),
        "INFO",
        "least severe log messages written",
    )
    log_format: str = setting(
        "LOG_FORMAT",
        Choice(("text", "json")),
        "text",
        "`json`: every line the process writes is one JSON object (time, level, logger,"
        " message, and `runId`, `userId`, `sessionId`, `worker` where they apply)",
    )
    metrics: bool = setting(
        "METRICS",
        Flag(),
        "on",
        "on: `GET /metrics` serves Prometheus metrics (public unless `METRICS_TOKEN` is"
        " set); off: it answers 404 and nothing is measured",
    )
    metrics_per_user: bool = setting(
        "METRICS_PER_USER",
        Flag(),
        "off",
        "on: cost and tokens in `/metrics` are labelled by user id (`user`); off: only the"
        " service's totals, and no user id appears in `/metrics`",
    )
    metrics_token: str = setting(
        "METRICS_TOKEN",
        Text("a secret"),
        "",
        "when set, `GET /metrics` answers only `Authorization: Bearer <METRICS_TOKEN>`"
        " (else 401); unset: it needs no credentials",
        secret=True,
        repr=False,
    )

    # Fixed, not read from the environment.
    base_body_bytes: int = 1024 * 1024  # largest request body accepted, images aside
    max_prompt_chars: int = 200_000  # longest prompt accepted (the original's bound)

    @property
    def max_body_bytes(self) -> int:
        """The largest JSON request body: 1 MiB, and room for ``MAX_IMAGES`` images of
        ``MAX_IMAGE_BYTES`` each in base64 (4 characters per 3 bytes; a ``data:`` URL's
        prefix and the JSON around each one counted as :data:`IMAGE_OVERHEAD_BYTES`).
        With the defaults: 1 MiB + 4 x 6.67 MiB, about 27.7 MiB."""
        per_image = 4 * -(-self.max_image_bytes // 3) + IMAGE_OVERHEAD_BYTES
        return self.base_body_bytes + self.max_images * per_image

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """``ALLOWED_MODELS`` with ``CLAUDE_MODEL`` (a request may always name the default)."""
        listed = self.allowed_models_setting or ()
        return listed if self.model in listed else (self.model, *listed)

    @property
    def user_queue_max(self) -> int:
        """``QUEUE_MAX_PER_USER``, or ``QUEUE_MAX`` when it is not set."""
        return self.queue_max if self.queue_max_per_user is None else self.queue_max_per_user

    @property
    def running_per_user_max(self) -> int:
        """``MAX_RUNNING_PER_USER``, or by default one less than the larger of ``POOL_SIZE``
        and ``MAX_LIVE_SESSIONS`` (at least 1): one user alone never holds every slot."""
        if self.max_running_per_user is not None:
            return self.max_running_per_user
        return max(1, max(self.pool_size, self.max_live_sessions) - 1)

    @property
    def kept_agents_max(self) -> int:
        """``AGENT_REUSE_MAX``, or by default ``POOL_SIZE``; 0 when ``AGENT_REUSE_S`` is 0.

        ``POOL_SIZE`` by default: as many users' agents as a pool of that size kept
        before kept agents were extra, so one user's figures stay; it costs as much
        memory again as the pool's warm agents (~190 MiB each), no more.
        """
        if self.agent_reuse_s <= 0:
            return 0
        return self.pool_size if self.agent_reuse_max is None else self.agent_reuse_max

    @property
    def spare_workers(self) -> int:
        """Workers beyond ``POOL_SIZE``, dormant until needed: with reuse, ``POOL_SIZE`` more
        (the agents jobs take are replaced as they start) and ``AGENT_REUSE_MAX`` (the
        agents kept); without, none (each worker replaces its agent after a job)."""
        return 0 if self.kept_agents_max == 0 else self.pool_size + self.kept_agents_max

    @property
    def kept_agent_s(self) -> float:
        """How long a used one-shot agent is kept: ``AGENT_REUSE_S``, 0 when none may be."""
        return self.agent_reuse_s if self.kept_agents_max > 0 else 0.0

    @property
    def default_timeout_ms(self) -> int:
        """``default_timeout_s`` in the unit of the API's ``timeoutMs``."""
        return round(self.default_timeout_s * 1000)

    @property
    def max_timeout_ms(self) -> int:
        """``max_timeout_s`` in the unit of the API's ``timeoutMs``."""
        return round(self.max_timeout_s * 1000)

    def user_for_key(self, presented: str) -> str | None:
        """The user id for an API key, or None. Compares every key in constant time.

        Never raises: a presented key that is not valid UTF-8 text matches no key."""
        found = None
        candidate = presented.encode("utf-8", "surrogatepass")
        for api_key in self.api_keys:
            if hmac.compare_digest(candidate, api_key.key.encode()):
                found = api_key.user_id
        return found


def declarations() -> list[tuple[str, EnvVar]]:
    """``(Settings attribute, declaration)`` for every setting read from the environment,
    in declaration order."""
    return [
        (field.name, field.metadata[_DECLARATION])
        for field in attrs.fields(Settings)
        if _DECLARATION in field.metadata
    ]


def parse_api_keys(raw: str) -> tuple[ApiKey, ...]:
    """Parse an ``API_KEYS`` value (see :class:`ApiKeys`); :class:`ConfigError` if bad."""
    try:
        return ApiKeys().parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"API_KEYS: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting from ``env`` (default ``os.environ``).

    A variable that is unset or blank takes its default. Raises :class:`ConfigError`
    naming the first bad variable.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for attribute, declared in declarations():
        raw = env.get(declared.name, "").strip()
        if not raw:
            continue
        try:
            values[attribute] = declared.kind.parse(raw)
        except ValueError as exc:
            shown = "" if declared.secret else f"={raw!r}"
            raise ConfigError(f"{declared.name}{shown}: {exc}") from None
    settings = Settings(**values)
    if settings.default_timeout_s > settings.max_timeout_s:
        raise ConfigError(
            f"DEFAULT_TIMEOUT_MS={settings.default_timeout_ms}: must not exceed"
            f" MAX_TIMEOUT_MS={settings.max_timeout_ms}"
        )
    ttl = settings.session_ttl_s
    if ttl is not None and ttl <= settings.session_idle_s + settings.max_timeout_s:
        # A live session (idle or in its longest turn) must never be expired under it.
        raise ConfigError(
            f"SESSION_TTL_MS={round(ttl * 1000)}: must exceed SESSION_IDLE_MS +"
            f" MAX_TIMEOUT_MS ({round((settings.session_idle_s + settings.max_timeout_s) * 1000)})"
            " or be 0 (never)"
        )
    return settings


# --- README's configuration table -----------------------------------------------------------------

TABLE_START = "<!-- configuration table: generated from claude_code_api/config/settings.py -->"
TABLE_END = "<!-- end of configuration table -->"


def _readable_duration(seconds: float) -> str:
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds * 1000:g} ms"


def _shown_default(declared: EnvVar) -> str:
    if declared.shown_default is not None:
        return declared.shown_default
    if not declared.default:
        return "—"
    shown = f"`{declared.default}`"
    if isinstance(declared.kind, Duration):
        seconds = declared.kind.parse(declared.default)
        if seconds is not None and seconds >= 60:
            shown += f" ({_readable_duration(seconds)})"
    return shown


def markdown_table() -> str:
    """README's configuration table, one row per declared setting."""
    rows = [
        "| Variable | Default | Accepts | |",
        "|---|---|---|---|",
    ]
    for _attribute, declared in declarations():
        rows.append(
            f"| `{declared.name}` | {_shown_default(declared)} | {declared.kind.accepts()}"
            f" | {declared.doc} |"
        )
    return "\n".join(rows) + "\n"


def with_table(readme: str) -> str:
    """``readme`` with the text between the table markers replaced by :func:`markdown_table`."""
    head, start, rest = readme.partition(TABLE_START + "\n")
    _old, end, tail = rest.partition(TABLE_END)
    if not (start and end):
        raise ValueError(f"README lacks the markers {TABLE_START!r} and {TABLE_END!r}")
    return head + start + markdown_table() + end + tail


USAGE = """usage: python -m claude_code_api.config README.md
Rewrites the settings table in README.md (between its markers) from the declarations in
claude_code_api/config/settings.py (the settings: README's "Configuration", or .env.example)."""


def path_argument(argv: list[str], usage: str) -> Path | int:
    """The one path a generator's command line names; else its exit status, the usage printed
    (0 for ``-h``/``--help``, 2 for anything else: never a file named after a flag)."""
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    return Path(argv[0])


def main(argv: list[str]) -> int:
    """``python -m claude_code_api.config README.md``: rewrite README's table from the declarations."""
    readme_path = path_argument(argv, USAGE)
    if isinstance(readme_path, int):
        return readme_path
    try:
        readme_path.write_text(with_table(readme_path.read_text()))
    except (OSError, ValueError) as exc:
        print(f"python -m claude_code_api.config: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
