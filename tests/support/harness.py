"""The one launcher of the real service, for the tests, the benchmarks and the soak.

The service runs as ``python -m claude_code_api`` in a subprocess on 127.0.0.1
(``PORT=0``) with the real SDK and ``tests/fake_claude.py`` as
``CLAUDE_EXECUTABLE``; callers talk to it over real HTTP with httpx.
:func:`launch_service` starts it, reads its log and finds its URL;
:func:`run_service` is the tests' form (stop it with a signal, check the exit
status); :func:`shared_service` holds one for a module's tests. Every fake CLI
process can write its pid into a directory, so a test can check that none
outlived the service or its job. ``bench/`` imports this module
as ``tests.support.harness`` (its scripts put the repository root on ``sys.path``).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import attrs
import httpx
import trio

from claude_code_api.agent.protocol import AgentFactory
from claude_code_api.config.settings import Settings, declarations
from claude_code_api.proxy.model import ModelProxy

ROOT = Path(__file__).resolve().parents[2]
FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"
API_KEY = "sk-test-key"
AUTH = {"x-api-key": API_KEY}
LISTENING = re.compile(r"listening on (http://[^\s\"]+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")

FAKE_CLAUDE_VARIABLES = (
    "FAKE_CLAUDE_HOME,FAKE_CLAUDE_PIDDIR,FAKE_CLAUDE_MODE,FAKE_CLAUDE_MODE_FILE,FAKE_CLAUDE_LOG,"
    "FAKE_CLAUDE_REFUSE_ROOT"
)
# Settings of the service and of the fake, never inherited from the caller's environment,
# so a variable exported in a developer's shell cannot change what a test or benchmark sees.
SERVICE_VARS = frozenset(
    [declared.name for _, declared in declarations()] + FAKE_CLAUDE_VARIABLES.split(",")
)


@attrs.define
class RunningService:
    """A started service: its URL, process, files and the lines of its log (stderr)."""

    url: str
    process: trio.Process
    piddir: Path | None  # None: the fakes write no pid files
    data_dir: Path
    fake_home: Path
    # Each line ends with "\n"; a bounded deque keeps only the last lines of a long run.
    log: collections.deque[str]
    # log_text() starts at this line: a test on a shared service sees only its own lines
    # (an unbounded log: see shared_service).
    log_start: int = 0
    fake_log: Path | None = None  # FAKE_CLAUDE_LOG: what each fake CLI did (see fake_turn_pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 60)
        # Plain HTTP on 127.0.0.1: nothing to verify, and httpx's default builds a TLS
        # context from certifi's bundle for every client (~30 ms of CPU each; the tests
        # open thousands, the health polls one every 50 ms).
        kwargs.setdefault("verify", False)
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    def fake_pids(self) -> list[int]:
        assert self.piddir is not None, "started without FAKE_CLAUDE_PIDDIR"
        return sorted(int(p.name) for p in self.piddir.iterdir())

    def live_fake_pids(self) -> list[int]:
        """Fake CLI processes still alive: running, or dead and not yet reaped by the service."""
        return [pid for pid in self.fake_pids() if process_exists(pid, reaper=self.pid)]

    def log_text(self) -> str:
        # list() copies in one step: a shared service's log grows on another thread.
        return "".join(list(self.log)[self.log_start :])

    async def wait_logged(self, text: str, timeout: float = 10.0) -> None:
        """Until ``text`` is in the log. While the service runs, its stderr is read by
        another task: a line written before a reply may not be read when the reply is."""

        async def logged() -> bool:
            return text in self.log_text()

        await wait_until(logged, timeout)

    def memory_kib(self) -> dict[str, int]:
        """The service process's VmRSS, RssAnon, RssFile and VmHWM, in KiB."""
        return proc_memory_kib(self.pid)

    def cpu_s(self) -> tuple[float, float]:
        """(its own CPU seconds, CPU seconds of its reaped children: the agents)."""
        return proc_cpu_s(self.pid)

    async def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Send ``signum`` and wait for the exit status; None if it had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        with trio.move_on_after(timeout_s):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        return None


def process_exists(pid: int, reaper: int | None = None) -> bool:
    """Whether the fake CLI ``pid`` runs, or is a zombie its parent ``reaper`` has not reaped.

    A zombie whose parent is another process is dead: after the service is gone, its orphans
    belong to PID 1 (or a subreaper), and whether that reaps them is no business of the tests
    (a container's PID 1 may be ``sleep infinity``, which never does).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The pid may have been reused by an unrelated process: check it is our fake.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state, parent = stat.rsplit(")", 1)[1].split()[:2]
    if state == "Z":
        return reaper is not None and int(parent) == reaper
    return b"fake_claude" in cmdline


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of ``pid`` in KiB, from /proc/<pid>/status."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "VmHWM"}
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in wanted:
            values[name] = int(rest.split()[0])
    return values


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(own CPU s, CPU s of its reaped children) of ``pid``, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def service_env(
    workdir: Path,
    overrides: Mapping[str, str] | None = None,
    *,
    record_pids: bool = True,
) -> dict[str, str]:
    """The environment of a service whose files live in ``workdir``.

    The caller's environment without any service or fake setting, then the test
    defaults (127.0.0.1, a free port, one key, ``POOL_SIZE=1``, the fake CLI with its
    home in ``workdir/fake-home``, pid files in ``workdir/pids`` when
    ``record_pids``), then ``overrides``. Creates the directories.
    """
    layout = {"DATA_DIR": workdir / "data", "FAKE_CLAUDE_HOME": workdir / "fake-home"}
    if record_pids:
        layout["FAKE_CLAUDE_PIDDIR"] = workdir / "pids"
    for path in layout.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {name: value for name, value in os.environ.items() if name not in SERVICE_VARS}
    env.update({name: str(path) for name, path in layout.items()})
    # The fake CLI's `#!/usr/bin/env python3` finds this interpreter first, not a shim
    # (pyenv's costs ~0.3 s a start: one per one-shot request).
    env["PATH"] = os.pathsep.join([fake_python_dir(), env.get("PATH", "")])
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": "0",
            "API_KEYS": API_KEY,
            "POOL_SIZE": "1",
            "CLAUDE_EXECUTABLE": str(FAKE_CLAUDE),
            # Agents get an allowlisted environment: the fake's own settings are passed by name.
            "AGENT_ENV": FAKE_CLAUDE_VARIABLES,
            # The fake writes pid files the tests read from outside: no pid namespace by
            # default (tests of the sandbox turn it on).
            "AGENT_SANDBOX": "off",
            # Each service holds its disk reserve in a file (DATA_DIR/.reserve): 256 MiB by
            # default, taken from /tmp by every test's service (a tmpfs /tmp: from RAM).
            "DISK_RESERVE_MB": "16",
            # The fake CLI makes no model call, so a warm-up turn would warm nothing: it
            # would only be one more fake turn in every test's log (tests of it turn it on).
            "AGENT_WARM_UP_TURN": "off",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides or {})
    open_to_agents(workdir, list(layout.values()), env)
    return env


def fake_python_dir() -> str:
    """Where the fake CLI's ``python3`` is found: this interpreter's, or as root the system's.

    A root service's agents run as AGENT_UID, which may not reach this interpreter (a
    pyenv install under /root); the fake needs only the standard library.
    """
    if os.geteuid() == 0 and (system := shutil.which("python3", path="/usr/bin:/bin")):
        return str(Path(system).parent)
    return str(Path(sys.executable).parent)


def open_to_agents(workdir: Path, writable: list[Path], env: Mapping[str, str]) -> None:
    """As root, let the agents' OS user (``AGENT_UID``) reach ``workdir`` and write there.

    A root service's agents run as AGENT_UID: the fake CLI writes its transcripts, pid
    files and log in ``workdir``, which pytest makes under a directory only root may pass.
    """
    if os.geteuid() != 0:
        return
    uid = int(env.get("AGENT_UID") or Settings().agent_uid)
    for directory in [workdir, *workdir.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o011)
    for directory in (workdir, *writable):
        if directory != workdir / "data":  # (the service's: it makes the agents' part theirs)
            os.chown(directory, uid, uid)


def service_agents(
    env: Mapping[str, str], model_proxy: ModelProxy | None = None
) -> tuple[Settings, AgentFactory]:
    """The settings and the agent factory a service started with ``env`` would use.

    Same launcher, sandbox decision, options and agent class as the service, for
    benchmarks that time an agent directly, without the service. Imports the SDK
    (about a second). Agents made by it are closed by their caller. Agents hold no model
    credential of their own: with the real CLI they reach the model API through
    ``model_proxy`` (serving), as the service's do; without one they are "Not logged in".
    """
    from claude_code_api.agent.sdk import AgentOptions, SdkAgentFactory
    from claude_code_api.agent.startup import plan_agents
    from claude_code_api.config.settings import load_settings

    settings = load_settings(env)
    plan = plan_agents(settings, env)
    options = AgentOptions(settings.model, settings.max_output_chars, settings.agent_warm_up_turn)
    return settings, SdkAgentFactory(
        plan.launcher, options, refusal=plan.refusal, model_proxy=model_proxy
    )


@asynccontextmanager
async def launch_service(
    env: Mapping[str, str],
    *,
    start_timeout_s: float = 30.0,
    log_lines: int | None = None,
    on_log_line: Callable[[str], None] | None = None,
    open_files_limit: int | None = None,
) -> AsyncIterator[RunningService]:
    """Start ``python -m claude_code_api`` with ``env``; yield it once it listens.

    Raises RuntimeError (with its log) if it exits or does not listen within
    ``start_timeout_s``. ``log_lines`` bounds the log kept (None: all of it);
    ``on_log_line`` sees every line. ``open_files_limit`` lowers the service's
    ``RLIMIT_NOFILE`` (soft and hard). On leaving, a service still running is killed
    (stop it first with :meth:`RunningService.stop` for a graceful exit), and the
    rest of its log is read for up to 5 s.
    """

    def url_in(line: str) -> str | None:
        match = LISTENING.search(line)
        return match.group(1) if match else None

    async with launch_process(
        [sys.executable, "-m", "claude_code_api"],
        env,
        cwd=ROOT,
        data_dir=Path(env["DATA_DIR"]),
        url_in=url_in,
        start_timeout_s=start_timeout_s,
        log_lines=log_lines,
        on_log_line=on_log_line,
        open_files_limit=open_files_limit,
    ) as service:
        yield service


@asynccontextmanager
async def launch_process(
    command: list[str],
    env: Mapping[str, str],
    *,
    cwd: Path,
    data_dir: Path,
    url_in: Callable[[str], str | None],
    start_timeout_s: float = 30.0,
    log_lines: int | None = None,
    on_log_line: Callable[[str], None] | None = None,
    open_files_limit: int | None = None,
    own_process_group: bool = False,
) -> AsyncIterator[RunningService]:
    """Start a service's ``command``; yield it once ``url_in`` finds its URL in a log line.

    The one launcher of the tests and of bench/ (also for the original TypeScript
    service, see bench/original.py). Its log is stderr and stdout, line by line.
    ``own_process_group``: it runs in a process group of its own, killed whole on
    leaving (for a launcher that does not pass signals on to its server).
    Otherwise as :func:`launch_service`.
    """
    log: collections.deque[str] = collections.deque(maxlen=log_lines)

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files_limit, open_files_limit))

    process = await trio.lowlevel.open_process(
        command,
        env=dict(env),
        cwd=str(cwd),
        stdout=subprocess.DEVNULL if not own_process_group else subprocess.PIPE,
        stderr=subprocess.PIPE if not own_process_group else subprocess.STDOUT,
        preexec_fn=None if open_files_limit is None else limit_open_files,
        start_new_session=own_process_group,
    )
    output = process.stdout if own_process_group else process.stderr
    assert output is not None
    url_found = trio.Event()
    log_ended = trio.Event()
    found: list[str] = []

    async def read_log() -> None:
        buffer = b""
        try:
            async for chunk in output:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace") + "\n"
                    log.append(line)
                    if on_log_line is not None:
                        on_log_line(line)
                    url = url_in(line)
                    if url is not None and not url_found.is_set():
                        found.append(url)
                        url_found.set()
        finally:
            log_ended.set()

    def kill() -> None:
        if own_process_group:
            # The whole group: a launcher, its server, agents not yet reaped.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        elif process.poll() is None:
            process.kill()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.move_on_after(start_timeout_s):
                while not url_found.is_set() and process.poll() is None:
                    with trio.move_on_after(0.05):
                        await url_found.wait()
            if not url_found.is_set():
                state = "exited early" if process.poll() is not None else "did not listen"
                raise RuntimeError(f"{command[-1]} {state}:\n{''.join(log)}")
            piddir = env.get("FAKE_CLAUDE_PIDDIR")
            fake_log = env.get("FAKE_CLAUDE_LOG")
            yield RunningService(
                found[0],
                process,
                Path(piddir) if piddir else None,
                data_dir,
                Path(env.get("FAKE_CLAUDE_HOME", data_dir)),
                log,
                fake_log=Path(fake_log) if fake_log else None,
            )
            kill()
            await process.wait()
            # Its log ends when it (and any agent holding it) has exited.
            with trio.move_on_after(5):
                await log_ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def run_service(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    fake_mode: str = "",
    stop_signal: int | None = signal.SIGTERM,
    expect_exit: int | None = 0,
    open_files_limit: int | None = None,
) -> AsyncIterator[RunningService]:
    """Start the service, wait until it listens, yield it; stop it and check it exited.

    ``stop_signal`` None: the test stops it itself. ``expect_exit`` None: any status.
    ``open_files_limit`` lowers the service's ``RLIMIT_NOFILE`` (soft and hard).
    """
    full_env = service_env(tmp_path, {"FAKE_CLAUDE_MODE": fake_mode, **(env or {})})
    async with launch_service(
        full_env, start_timeout_s=20, open_files_limit=open_files_limit
    ) as service:
        yield service
        if stop_signal is not None and service.process.poll() is None:
            service.process.send_signal(stop_signal)
        with trio.fail_after(60):
            code = await service.process.wait()
        if expect_exit is not None:
            assert code == expect_exit, f"service exited {code}:\n{service.log_text()}"


@contextmanager
def shared_service(
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
) -> Iterator[RunningService]:
    """:func:`run_service` for several tests: a module's fixture, in a thread of its own.

    pytest-trio gives every test its own trio loop, so a service that outlives one test
    cannot be held by a test's loop: a thread runs a loop that starts it, holds it until
    the context exits, then stops it with SIGTERM, checks it exited 0 as
    :func:`run_service` does and that no fake CLI outlived it. A failure is raised here
    (the fixture's teardown fails). The fakes log to ``workdir/fake.log`` unless ``env``
    says otherwise: a test finds its agent there (:func:`fake_turn_pid`).

    Tests talk to it over HTTP from their own loops; each takes :func:`for_one_test`'s
    view of it and must not stop or kill it, nor depend on what other tests did to it:
    users or session ids of its own, counts taken as differences.
    """
    Started = tuple[RunningService, trio.lowlevel.TrioToken, trio.Event]
    handed: queue.Queue[Started | None] = queue.Queue()
    failures: list[BaseException] = []
    env = {"FAKE_CLAUDE_LOG": str(workdir / "fake.log"), **(env or {})}

    async def hold() -> None:
        stop = trio.Event()
        async with run_service(workdir, env=env) as service:
            handed.put((service, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()
        if service.piddir is not None:
            await wait_no_live_fakes(service)  # no agent outlives the service

    def host() -> None:
        try:
            trio.run(hold)
        except BaseException as failure:  # raised by the fixture, in the test's thread
            failures.append(failure)
        finally:
            handed.put(None)  # a fixture still waiting for the service: it never started

    thread = threading.Thread(target=host, name=f"service {workdir.name}", daemon=True)
    thread.start()
    started = handed.get(timeout=60)  # run_service gives up after 20 s
    if started is None:
        thread.join()
        raise failures[0] if failures else RuntimeError("the shared service did not start")
    service, token, stop = started
    try:
        yield service
    finally:
        try:
            trio.from_thread.run_sync(stop.set, trio_token=token)
        except trio.RunFinishedError:
            pass
        thread.join(90)  # run_service waits up to 60 s for the exit
        if thread.is_alive():  # never leave a service behind the test run
            service.process.kill()
            raise RuntimeError(f"the shared service did not stop:\n{service.log_text()}")
        if failures:
            raise failures[0]


async def for_one_test(shared: RunningService, *, timeout: float = 20.0) -> RunningService:
    """``shared`` once its pool is idle and whole again, with a log of this test's lines."""
    assert shared.process.poll() is None, f"the shared service exited:\n{shared.log_text()}"
    body: dict = {}
    async with shared.client() as client:

        async def idle() -> bool:
            nonlocal body
            body = (await client.get("/health")).json()
            workers = body["workers"]
            return (
                workers["ready"] == workers["total"] > 0
                and workers["busy"] == 0
                and body["queue"]["length"] == 0
            )

        try:
            await wait_until(idle, timeout, interval=0.02)
        except trio.TooSlowError:
            # Most likely an earlier test failed and left work behind: say so, not just "slow".
            raise AssertionError(f"the shared service is not idle: {body}") from None
    return attrs.evolve(shared, log_start=len(shared.log))


async def fake_turn_pid(service: RunningService, prompt: str, timeout: float = 20.0) -> int:
    """The pid of the fake CLI that began a turn with ``prompt``, once one has (its log)."""
    assert service.fake_log is not None, "started without FAKE_CLAUDE_LOG"
    log = service.fake_log
    pids: list[int] = []

    async def began() -> bool:
        lines = log.read_text().splitlines() if log.exists() else []
        records = [json.loads(line) for line in lines]
        pids[:] = [r["pid"] for r in records if r["event"] == "turn" and r["prompt"] == prompt]
        return bool(pids)

    await wait_until(began, timeout)
    return pids[0]


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


async def wait_no_live_fakes(service: RunningService, timeout: float = 10.0) -> None:
    async def none_alive() -> bool:
        return not service.live_fake_pids()

    await wait_until(none_alive, timeout)


async def wait_health_status(service: RunningService, status: str, timeout: float = 20.0) -> dict:
    """Until ``/health`` says ``status`` (e.g. "degraded"); returns that body."""
    body: dict = {}
    async with service.client() as client:

        async def says_it() -> bool:
            nonlocal body
            body = (await client.get("/health")).json()
            return body["status"] == status

        await wait_until(says_it, timeout, interval=0.05)
    return body


async def wait_healthy(service: RunningService, *, ready: int, timeout: float = 15.0) -> dict:
    body: dict = {}
    async with service.client() as client:

        async def pool_ready() -> bool:
            nonlocal body
            body = (await client.get("/health")).json()
            return body["workers"]["ready"] >= ready

        await wait_until(pool_ready, timeout, interval=0.05)
    return body


async def wait_pool_ready(
    client: httpx.AsyncClient, *, timeout: float = 15.0, interval: float = 0.02
) -> float:
    """Poll ``/health`` until every worker is ready; returns the seconds waited."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            workers = (await client.get("/health")).json()["workers"]
            if workers["total"] > 0 and workers["ready"] == workers["total"]:
                return trio.current_time() - started
            await trio.sleep(interval)
