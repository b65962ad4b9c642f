"""The agent reaper: kills every agent's process group when the service dies.

Run by the service as ``python -I -S agent_reaper.py`` (standard library only)
with a pipe on its standard input. The service writes ``+PGID`` when an agent
starts and ``-PGID`` when it has closed it. When the pipe reaches end of file —
the service exited, however it died, even by SIGKILL — the reaper SIGKILLs every
process group still registered (each agent runs in a group of its own, its
tools included), then exits. It ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C
in the service's terminal is the service's to handle, not a reason to stop
guarding its agents.
"""

import os
import signal
import sys


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        op, _, number = line.strip().partition(" ")
        if not number.isdigit():
            continue
        if op == "+":
            groups.add(int(number))
        elif op == "-":
            groups.discard(int(number))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
