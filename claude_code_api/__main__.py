"""``claude-code-api`` / ``python -m claude_code_api``: the command line.

``serve`` (also with no command, as the Dockerfile and ``scripts/serve`` run it):
configure, serve, exit cleanly. ``check``: what an operator runs first — the
settings, the Claude Code CLI, the sandbox, the credentials and the model API,
one line each. ``login``: log the service's Claude config dir in with the CLI.

Exit status: 0 after a shutdown by SIGTERM/SIGINT (``serve``) or when every
check passed (``check``); 2 for bad configuration (one line naming the variable,
no traceback) and for bad arguments (usage on stderr); 1 if the service cannot
start (port taken, unreadable session database, ``AGENT_SANDBOX=on`` without a
sandbox: one line) or gave up, a check failed, or the login did not complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from urllib.parse import urlsplit

import trio

from . import __version__
from .actors.supervision import TooManyRestarts
from .agent.sandbox import resolve_cli, service_claude_dir
from .agent.startup import Finding, StartupError, Status, check_all, http_probe
from .config.settings import ConfigError, Settings, load_settings
from .http.auth import auth_warnings
from .observe import logs
from .service import Service
from .store import StoreUnavailable as RegistryError

log = logging.getLogger("claude_code_api")


async def serve(settings: Settings) -> None:
    """Run the service until a signal stops it. A second signal skips the grace."""
    service = Service(settings)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_then_stop_listening() -> None:
                await service.run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_then_stop_listening)
            shutting_down = False
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                if not shutting_down:
                    shutting_down = True
                    nursery.start_soon(service.shutdown, settings.shutdown_grace_s)
                else:
                    nursery.start_soon(service.shutdown, 0)


PROG = "claude-code-api"
DESCRIPTION = """\
The Claude Code agent as an HTTP service: POST /run answers a prompt (one-shot or in a
session), with API keys, streaming, cancellation and metrics. Compatible with
exitxio/claude-code-api."""
EPILOG = """\
Settings are environment variables (API_KEYS, PORT, DATA_DIR, ...), each documented in
README.md, section "Configuration", and in .env.example; `claude-code-api check` validates
them. Without a Claude account, `scripts/demo` (`python -m claude_code_api.demo`) shows the
service answering, with a local stand-in for the model (README: Quick start)."""


def parser() -> argparse.ArgumentParser:
    """The command line; ``parse_args`` exits 2 with the usage on stderr for anything else."""
    top = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", title="commands", metavar="{serve,check,login}")
    commands.add_parser(
        "serve",
        help="serve the API on HOST:PORT until SIGTERM/SIGINT (the default)",
        description="Serve the API on HOST:PORT (default 0.0.0.0:8080) until SIGTERM or "
        "SIGINT; a second signal skips the grace. Exit 0 after a clean shutdown, 2 for bad "
        "settings, 1 when the service cannot start.",
        epilog=EPILOG,
    )
    commands.add_parser(
        "check",
        help="check the settings, the Claude Code CLI, the sandbox, the credentials and "
        "the model API; one line each (exit 0: all pass, 1: one failed, 2: bad settings)",
        description="Check what the service needs, one line each (ok, warn or FAIL, and what "
        "to do): the settings, the Claude Code CLI (it runs), the agent sandbox "
        "(AGENT_SANDBOX), running as root, the Claude credentials, and the model API "
        "(an HTTP request to ANTHROPIC_BASE_URL or api.anthropic.com, 5 s timeout). Binds no "
        "port. Exit 0 when nothing failed, 1 otherwise, 2 for bad settings.",
        epilog=EPILOG,
    )
    login = commands.add_parser(
        "login",
        help="log the service in to a Claude account with the bundled CLI (needs a terminal)",
        description="Run the Claude Code CLI's `auth login` with the service's Claude config "
        "dir (CLAUDE_CONFIG_DIR, else ~/.claude), where the service and its agents read the "
        "login. It shows a URL to open in a browser and asks for the code shown there, so it "
        "needs a terminal; without one, log in through the API (POST /auth/login, "
        "/auth/exchange) or set ANTHROPIC_API_KEY and USE_CLAUDE_API_KEY=1.",
        epilog=EPILOG,
    )
    how = login.add_mutually_exclusive_group()
    how.add_argument("--console", action="store_true", help="an Anthropic Console account")
    how.add_argument("--sso", action="store_true", help="log in with SSO")
    login.add_argument("--email", help="fill in the email address on the login page")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.command == "check":
        sys.exit(check(settings))
    if args.command == "login":
        sys.exit(login(settings, console=args.console, sso=args.sso, email=args.email))
    logs.configure(settings.log_level, settings.log_format)
    for warning in auth_warnings(settings):
        log.warning("%s", warning)
    sys.exit(run(settings))


def check(settings: Settings) -> int:
    """Print one line per check (the settings were read already); 0 when none failed."""
    where = f"serving on {settings.host}:{settings.port}, DATA_DIR={settings.data_dir}"
    findings = [Finding("settings", Status.OK, f"valid ({where})")]
    findings += [Finding("callers", Status.WARN, warning) for warning in auth_warnings(settings)]
    _print(findings)
    # The slow ones (the CLI runs, bubblewrap, up to 5 s for the model API) after what is known.
    more = check_all(settings, os.environ)
    _print(more)
    failed = sum(finding.status is Status.FAIL for finding in more)
    if failed:
        print(f"{failed} check(s) failed: agents will not answer until they pass", flush=True)
        return 1
    return 0


def _print(findings: list[Finding]) -> None:
    for finding in findings:
        print(f"{finding.status.value:<4}  {finding.subject}: {finding.text}", flush=True)


def login(settings: Settings, *, console: bool, sso: bool, email: str | None) -> int:
    """Run the CLI's ``auth login`` for the service's config dir; its exit status."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            f"{PROG}: login needs a terminal (it shows a URL to open and asks for the code the "
            "browser shows); run it in an interactive shell (`docker compose exec -it ...`), or "
            "log in through the API (POST /auth/login, then /auth/exchange: README, Claude "
            "login), or set ANTHROPIC_API_KEY and USE_CLAUDE_API_KEY=1",
            file=sys.stderr,
        )
        return 1
    try:
        cli = resolve_cli(settings.claude_executable)
    except FileNotFoundError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    # The CLI would show the URL and wait for a code it cannot exchange: say so at once.
    token_host = urlsplit(settings.claude_oauth_token_url)
    origin = f"{token_host.scheme}://{token_host.netloc}/"
    reached = http_probe("HEAD", origin)
    if isinstance(reached, str):
        print(
            f"{PROG}: cannot reach Claude's login at {origin} ({reached}); check the network "
            "or the proxy (HTTPS_PROXY)",
            file=sys.stderr,
        )
        return 1
    config_dir = service_claude_dir(os.environ)
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [str(cli), "auth", "login"]
    command += ["--console"] if console else ["--sso"] if sso else []
    command += ["--email", email] if email else []
    print(f"{PROG}: logging in {config_dir} (CLAUDE_CONFIG_DIR) with: {' '.join(command)}")
    environ = dict(os.environ, CLAUDE_CONFIG_DIR=str(config_dir))
    try:
        return subprocess.run(command, env=environ, check=False).returncode
    except KeyboardInterrupt:
        return 130


def run(settings: Settings) -> int:
    """Serve until stopped; the exit status, after one line saying why if it is not 0."""
    # Nothing may be raised inside an except* handler, sys.exit() included: early 3.11 releases
    # (Debian 12's 3.11.2; not 3.11.7) wrap it in an exception group, which prints a traceback.
    status = 0
    try:
        trio.run(serve, settings)
    except* RegistryError as group:
        print(f"claude-code-api: session registry: {_first(group)}", file=sys.stderr)
        status = 1
    except* StartupError as group:
        print(f"claude-code-api: cannot start: {_first(group)}", file=sys.stderr)
        status = 1
    except* TooManyRestarts as group:
        log.error("giving up: %s", _first(group))
        status = 1
    except* OSError as group:
        print(f"claude-code-api: cannot serve: {_first(group)}", file=sys.stderr)
        status = 1
    return status


def _first(error: BaseException) -> BaseException:
    """The first exception in a group, however deeply nested (trio nests nurseries' groups)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    main()
