"""The original service, exitxio/claude-code-api, prepared and launched for side-by-side figures.

Owns a cache of the original's source and its npm dependencies
(``bench/.cache/original/<commit>/``, ignored by git) and its launch against our
fake CLI. The benchmarks' ``--original`` mode uses it: :func:`prepare` once, then
:func:`launch` for either side, so ours and the original start from the same kind
of environment (``tests.support.harness.service_env``: the fake CLI, its interpreter first
on PATH, one API key).

The source comes from a git repository of the original (bare or a clone):
``--original-repo PATH``, else ``$ORIGINAL_REPO``, else this workplace's mirror. Its
HEAD is archived into the cache, and ``package.json`` is pinned to the exact
versions of the original's ``pnpm-lock.yaml`` (direct dependencies, and npm
``overrides`` for the rest) before ``npm install``, so the same commit always runs
with the same claude-agent-sdk. When there is no repository, no node/npm, or the
install fails, :func:`prepare` returns the reason as a line to print: the
benchmark then skips the original and never fails for it.

How the original runs here, and how that differs from its image:

* ``node node_modules/tsx/dist/cli.mjs server/agent-server.ts``: tsx's launcher
  process, the server (a second node process) and tsx's esbuild helpers. The
  image runs ``npx tsx /app/server/agent-server.ts``, one more node process (npx).
* ``NODE_ENV`` unset: the image sets ``production``, which moves the agents' cwd to
  ``/home/node/users/<user>`` (a ``git init`` there on first use) and ``chdir``s to
  ``/app``; neither exists here. Its agents run in the launch directory instead.
* It finds the CLI through ``CLAUDE_EXECUTABLE`` because neither
  ``/usr/local/bin/claude`` nor ``/usr/bin/claude`` exists (checked: if one does,
  the original would run that instead of the fake, and :func:`prepare` says so).
  The TypeScript SDK runs ``tests/fake_claude.py`` directly (its shebang), with
  the server's whole environment.
* ``PORT`` is a free port picked here: the original has no ``PORT=0`` (it would
  listen on a random port and log ``:0``) and no ``HOST`` (it listens on every
  interface; we talk to it on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import attrs

from tests.support.harness import ROOT, RunningService, launch_process, launch_service

OURS, ORIGINAL = "ours", "original"
UPSTREAM = "https://github.com/exitxio/claude-code-api"
DEFAULT_REPO = Path("/work/.mirror/exitxio+claude-code-api/repo")
CACHE = ROOT / "bench" / ".cache" / "original"
# What the original logs (console.log, on stdout) once its HTTP server listens.
LISTENING = "Agent server running on"
# Where the original looks for the CLI before CLAUDE_EXECUTABLE.
SYSTEM_CLAUDES = (Path("/usr/local/bin/claude"), Path("/usr/bin/claude"))
NPM_TIMEOUT_S = 600
# Lines of `package.json` pinned, written into the cache when the install succeeded.
STAMP = ".prepared"


@attrs.frozen
class OriginalBuild:
    """The original's source at one commit with its dependencies installed."""

    directory: Path
    commit: str
    commit_date: str
    sdk_version: str
    tsx_version: str
    node_version: str

    def describe(self) -> str:
        return (
            f"exitxio/claude-code-api @ {self.commit} ({self.commit_date}); "
            f"@anthropic-ai/claude-agent-sdk {self.sdk_version}, tsx {self.tsx_version} "
            f"(pinned from its pnpm-lock.yaml); node {self.node_version}; "
            f"in {self.directory}"
        )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def lockfile_pins(lockfile: str) -> dict[str, str]:
    """Every package of a pnpm lockfile (v9) and its locked version, from ``snapshots:``."""
    snapshots = lockfile.split("\nsnapshots:\n", 1)[-1]
    entry = re.compile(r"^  '?(@?[^@\s']+)@([^('\s:]+)(?:\([^']*\))?'?:", re.MULTILINE)
    return {m.group(1): m.group(2) for m in entry.finditer(snapshots)}


def pin_package_json(directory: Path) -> str:
    """Rewrite ``package.json``: exact locked versions, and overrides for the rest."""
    pins = lockfile_pins((directory / "pnpm-lock.yaml").read_text())
    package = json.loads((directory / "package.json").read_text())
    direct = set()
    for section in ("dependencies", "devDependencies"):
        for name in package.get(section, {}):
            package[section][name] = pins[name]
            direct.add(name)
    # npm refuses an override of a direct dependency that differs from its spec.
    package["overrides"] = {name: v for name, v in sorted(pins.items()) if name not in direct}
    text = json.dumps(package, indent=2) + "\n"
    (directory / "package.json").write_text(text)
    return text


def prepare(repo: Path | None = None, *, log: bool = True) -> OriginalBuild | str:
    """The original, ready to launch; or why it cannot be (a line to print).

    Blocking: the first call per commit runs ``npm install`` (about 10 s, 140 MB).
    """
    source = repo or Path(os.environ.get("ORIGINAL_REPO") or DEFAULT_REPO)
    how = (
        f"clone it (`git clone {UPSTREAM} PATH`) and pass --original-repo PATH "
        f"(or set ORIGINAL_REPO)"
    )
    if not source.exists():
        return f"original skipped: no repository at {source}; {how}"
    try:
        commit = _git(source, "rev-parse", "HEAD")
        commit_date = _git(source, "log", "-1", "--format=%cI", commit)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"original skipped: {source} is not a git repository of it ({exc}); {how}"
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "original skipped: it needs node (>= 18) and npm on PATH"
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    present = [str(p) for p in SYSTEM_CLAUDES if p.exists()]
    if present:
        return (
            f"original skipped: it would run {present[0]} instead of the fake CLI "
            f"(it looks there before CLAUDE_EXECUTABLE)"
        )
    directory = CACHE / commit[:12]
    if not (directory / STAMP).exists():
        if log:
            print(f"  preparing the original at {commit[:12]} in {directory} (npm install) ...")
        staging = directory.with_name(directory.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            archive = subprocess.run(
                ["git", "-C", str(source), "archive", commit],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
            pinned = pin_package_json(staging)
            install = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return f"original skipped: preparing it failed: {exc!r}"
        if install.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = " | ".join((install.stderr or install.stdout).strip().splitlines()[-5:])
            return f"original skipped: npm install failed ({install.returncode}): {tail}"
        (staging / STAMP).write_text(pinned)
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)

    def version(package: str) -> str:
        manifest = directory / "node_modules" / package / "package.json"
        return str(json.loads(manifest.read_text())["version"])

    return OriginalBuild(
        directory,
        commit,
        commit_date,
        version("@anthropic-ai/claude-agent-sdk"),
        version("tsx"),
        node_version.strip(),
    )


def free_port() -> int:
    """A port free on 127.0.0.1 now (the original cannot pick its own and tell us)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_original(
    build: OriginalBuild,
    env: Mapping[str, str],
    cwd: Path,
    *,
    start_timeout_s: float = 30.0,
    log_lines: int | None = 2000,
) -> AbstractAsyncContextManager[RunningService]:
    """Start the original with ``env`` (its ``PORT`` replaced by a free one) in ``cwd``.

    Yields it as a :class:`~tests.support.harness.RunningService` once it logs that it
    listens (its workers may still be warming: poll ``/health``), through the
    tests' launcher: RuntimeError with its log if it exits or does not listen in
    time. It runs in a process group of its own (tsx's launcher, the server,
    esbuild, its agents), killed whole on leaving (stop it first with
    :meth:`RunningService.stop` for a graceful exit).
    """
    port = free_port()
    full_env = {name: value for name, value in env.items() if name != "NODE_ENV"}
    full_env["PORT"] = str(port)
    cwd.mkdir(parents=True, exist_ok=True)
    return launch_process(
        [
            "node",
            str(build.directory / "node_modules" / "tsx" / "dist" / "cli.mjs"),
            str(build.directory / "server" / "agent-server.ts"),
        ],
        full_env,
        cwd=cwd,
        data_dir=cwd,
        url_in=lambda line: f"http://127.0.0.1:{port}" if LISTENING in line else None,
        start_timeout_s=start_timeout_s,
        log_lines=log_lines,
        own_process_group=True,
    )


def launch(
    side: str,
    build: OriginalBuild | None,
    env: Mapping[str, str],
    workdir: Path,
    *,
    start_timeout_s: float = 30.0,
) -> AbstractAsyncContextManager[RunningService]:
    """Either side, started with ``env``: ours with the tests' launcher, or the original."""
    if side == OURS:
        return launch_service(env, start_timeout_s=start_timeout_s, log_lines=2000)
    assert build is not None
    return launch_original(build, env, workdir / "original-cwd", start_timeout_s=start_timeout_s)


def add_side_by_side_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--original``, ``--original-repo`` and ``--vs-rounds``, in a group a benchmark adds to."""
    vs = parser.add_argument_group("side by side with the original (--original)")
    vs.add_argument(
        "--original",
        action="store_true",
        help="measure ours and exitxio/claude-code-api side by side instead (bench/original.py)",
    )
    vs.add_argument(
        "--original-repo",
        type=Path,
        metavar="PATH",
        help="a git repository of the original (default: $ORIGINAL_REPO, else the mirror)",
    )
    vs.add_argument("--vs-rounds", type=int, default=5, help="interleaved rounds (default 5)")
    return vs


def round_orders(rounds: int, sides: list[str]) -> list[list[str]]:
    """Which side goes first in each round: alternating (A B, B A, A B, ...), so
    neither always runs right after the other's load or always on a cooler machine."""
    return [sides if r % 2 == 0 else sides[::-1] for r in range(rounds)]


def sides_of(build: OriginalBuild | str) -> list[str]:
    return [OURS, ORIGINAL] if isinstance(build, OriginalBuild) else [OURS]


def header_lines(build: OriginalBuild | str, agents: str = "the fake CLI") -> list[str]:
    """What the output says about the original: the commit and versions, or why skipped.

    ``agents``: what its ``CLAUDE_EXECUTABLE`` runs."""
    if isinstance(build, str):
        return [f"  {build}"]
    return [
        f"  original:        {build.describe()}",
        "  launched as:     node node_modules/tsx/dist/cli.mjs server/agent-server.ts "
        "(the image: npx tsx ...), NODE_ENV unset, PORT a free port, agents = "
        f"CLAUDE_EXECUTABLE = {agents}",
    ]
