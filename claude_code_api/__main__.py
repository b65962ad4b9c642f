"""``claude-code-api`` / ``python -m claude_code_api``: configure, serve, exit cleanly.

Exit status: 0 after a shutdown by SIGTERM/SIGINT, 2 for bad configuration
(one line naming the variable, no traceback), 1 if the service cannot start
(port taken, unreadable session database, ``AGENT_SANDBOX=on`` without a
sandbox: one line) or gave up.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from . import logs
from .actors.registry import RegistryError
from .config import ConfigError, Settings, load_settings
from .http.auth import auth_warnings
from .startup import StartupError
from .supervision import TooManyRestarts
from .supervisor import Service

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


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"claude-code-api: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format)
    for warning in auth_warnings(settings):
        log.warning("%s", warning)
    sys.exit(run(settings))


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
