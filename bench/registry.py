"""Benchmark of the session registry: acknowledged saves per second and per-save latency.

Prints figures; it is not a test. It runs the registry actor (``serve_registry``
over a real ``SqliteSessionTable`` on disk) in this process and times
``RegistryClient.save`` until the record is durable, in two phases:

1. one saver: ``--saves`` saves one after another (a session finishing turns
   back to back);
2. ``--savers`` (20) concurrent savers, ``--saves`` saves each (20 sessions
   finishing turns at once).

For each: saves/s (all saves / wall time) and per-save latency p50 / p99 / max.
Every save rewrites an existing record (an update, as after a turn); the
database holds ``--records`` records of other users beforehand.

When ``SaveSession`` has no reply (the registry before acknowledged saves), a
save is timed until a ``load`` queued behind it is answered: the registry handles
its inbox in order, so that is when the save was committed.

    .venv/bin/python -m bench.registry            # a few seconds
    .venv/bin/python -m bench.registry --help

``--dir`` chooses where the database lives (default: a temporary directory);
its filesystem decides what an fsync costs, so the figures are only comparable
on the same one. The script prints it, and the load average (figures from a
busy machine are not comparable either). ``--synchronous FULL`` overrides the
store's setting, to separate what group commit buys from what the sync level buys.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

from bench.stats import QuietMeter, percentile, quiet_verdict
from claude_code_api.actors import registry as reg
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.messages import SessionKey
from claude_code_api.store import SessionRecord, SqliteSessionTable, new_session_record
from claude_code_api.store.sqlite import DB_FILENAME

ACKNOWLEDGED = "reply" in attrs.fields_dict(reg.SaveSession)
INBOX_SIZE = 1024  # as supervisor.REGISTRY_INBOX_SIZE
TIMEOUT_S = 300.0


async def durable_save(client: RegistryClient, record: SessionRecord) -> None:
    await client.save(record)
    if not ACKNOWLEDGED:
        await client.load(record.key)  # answered once the save before it is committed


def report(name: str, latencies: list[float], wall_s: float) -> None:
    ms = [s * 1000 for s in latencies]
    print(
        f"{name:<28} {len(ms) / wall_s:>9.0f} saves/s   latency ms: "
        f"p50 {percentile(ms, 50):6.3f}  p99 {percentile(ms, 99):6.3f}  max {max(ms):6.3f}"
    )


async def saver(client, key: SessionKey, saves: int, latencies: list[float]) -> None:
    record = new_session_record(key, time.time())
    await durable_save(client, record)  # created; the timed saves are updates
    for turn in range(1, saves + 1):
        record = attrs.evolve(record, turns=turn, last_activity=time.time())
        started = time.perf_counter()
        await durable_save(client, record)
        latencies.append(time.perf_counter() - started)


async def phase(client, savers: int, saves: int, name: str) -> float:
    """Run and print one phase; the share of the CPUs other processes used meanwhile."""
    latencies: list[float] = []
    meter = QuietMeter()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(savers):
            nursery.start_soon(saver, client, SessionKey("bench", f"{name}-{n}"), saves, latencies)
    report(name, latencies, time.perf_counter() - started)
    line, share = meter.report()
    print(line)
    return share


def prefill(path: Path, records: int) -> None:
    store = SqliteSessionTable(path)
    try:
        for i in range(records):
            store.save(new_session_record(SessionKey(f"user-{i % 50}", f"s-{i}"), time.time()))
    finally:
        store.close()


async def main(args: argparse.Namespace) -> None:
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        await run(args, directory)
    finally:
        if not args.dir:
            shutil.rmtree(directory)


async def run(args: argparse.Namespace, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DB_FILENAME
    if path.exists():
        sys.exit(f"{path} exists; give an empty --dir")
    df = subprocess.run(["df", "--output=fstype,source", str(directory)], capture_output=True)
    filesystem = " ".join(df.stdout.decode().split()[2:]) or "?"
    print(f"database: {path} ({filesystem}); load average {os.getloadavg()[0]:.2f}")
    print(f"registry: {'acknowledged saves' if ACKNOWLEDGED else 'fire-and-forget saves'}")
    prefill(path, args.records)
    store = await trio.to_thread.run_sync(SqliteSessionTable, path)
    if args.synchronous:  # to tell what batching buys from what the sync level buys
        store._db.execute(f"PRAGMA synchronous = {args.synchronous}")
    (sync,) = store._db.execute("PRAGMA synchronous").fetchone()
    print(f"synchronous = {['OFF', 'NORMAL', 'FULL', 'EXTRA'][sync]}, {args.records} records")
    send, inbox = trio.open_memory_channel(INBOX_SIZE)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(reg.serve_registry, store, inbox)
            async with send:
                client = RegistryClient(send)
                quiet = [await phase(client, 1, args.saves, "one saver")]
                quiet.append(
                    await phase(client, args.savers, args.saves, f"{args.savers} concurrent savers")
                )
    print(quiet_verdict(quiet))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=500, help="saves per saver (500)")
    parser.add_argument("--savers", type=int, default=20, help="concurrent savers (20)")
    parser.add_argument("--records", type=int, default=2000, help="records beforehand (2000)")
    parser.add_argument("--dir", help="an empty directory for the database (default: a temp dir)")
    parser.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL"],
        help="override the store's PRAGMA synchronous (default: the store's own)",
    )
    trio.run(main, parser.parse_args())
