"""``claude-code-api`` / ``python -m claude_code_api``: configure, serve, exit cleanly.

Exit status: 0 after a shutdown by SIGTERM/SIGINT, 2 for bad configuration
(one line naming the variable, no traceback), 1 if the service cannot start
(port taken, unreadable session database: one line) or gave up.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from .actors.registry import RegistryError
from .config import ConfigError, Settings, load_settings
from .http.auth import auth_warnings
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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"claude-code-api: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    for warning in auth_warnings(settings):
        log.warning("%s", warning)
    try:
        trio.run(serve, settings)
    except* RegistryError as group:
        print(f"claude-code-api: session registry: {group.exceptions[0]}", file=sys.stderr)
        sys.exit(1)
    except* TooManyRestarts as group:
        log.error("giving up: %s", group.exceptions[0])
        sys.exit(1)
    except* OSError as group:
        print(f"claude-code-api: cannot serve: {group.exceptions[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
