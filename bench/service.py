"""What the benchmarks of the real service share: its launch, its clients, a timed call.

Owns the benchmarks' constants (one API key, the prompt, the bound on every wait, so a
benchmark always stops by itself) and thin helpers over ``tests/support/harness.py``, the one
launcher of the tests, the benchmarks and the soak: the service's environment, a client
with enough connections, waiting for a ready pool, one ``POST /run`` and its outcome,
timing a call, and agents made exactly as the service makes them (:class:`Direct`).

Error handling: a reply that should have succeeded and did not raises RuntimeError with
its status and body; every wait raises ``trio.TooSlowError`` past its bound.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.original import OriginalBuild, launch
from bench.stats import SideBySide, section
from claude_code_api.agent.protocol import Agent, AgentSpec
from claude_code_api.limits.usage import UsageLedger
from claude_code_api.proxy.model import ModelProxy, UpstreamCredential, upstream_url
from tests.support.harness import RunningService, service_agents, service_env, wait_pool_ready

PROMPT = "What is 2+2?"
API_KEY = "sk-bench-key"
AUTH = {"x-api-key": API_KEY}
START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0


def options(parser: Any, **declared: tuple[Any, str]) -> Any:
    """Add ``--name`` (underscores as dashes) for each keyword ``name=(default, help)`` to
    ``parser`` (or an argument group), typed as its default; returns ``parser``."""
    for name, (default, text) in declared.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=f"{text} ({default})")
    return parser


Mode = Callable[[Any, Path, float], Awaitable[None]]


async def run_mode(args: Any, prefix: str, run: Mode, side_by_side: Mode) -> None:
    """``run`` (or ``side_by_side`` with ``--original``) in a scratch directory."""
    started = time.perf_counter()
    with workdir(prefix) as where:
        await (side_by_side if args.original else run)(args, where, started)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory for one run, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def bench_env(where: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment in ``where``: the fake CLI, :data:`API_KEY`, ``overrides``.

    No pid files: the fakes start as they would in production, without the extra write.
    """
    return service_env(where, {"API_KEYS": API_KEY, **(overrides or {})}, record_pids=False)


def client_of(service: RunningService, connections: int = 4, **kwargs: Any) -> httpx.AsyncClient:
    """A client of ``service`` keeping up to ``connections`` connections alive."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
    return service.client(limits=limits, **kwargs)


async def wait_ready(client: httpx.AsyncClient, interval: float = 0.005) -> float:
    """Poll ``/health`` until every worker is ready; the seconds waited."""
    return await wait_pool_ready(client, timeout=READY_TIMEOUT_S, interval=interval)


async def post_run(
    client: httpx.AsyncClient, prompt: str = PROMPT, headers: dict[str, str] = AUTH, **fields: Any
) -> httpx.Response:
    """One ``POST /run`` of ``prompt`` (and ``fields``)."""
    return await client.post("/run", json={"prompt": prompt, **fields}, headers=headers)


async def run_ok(
    client: httpx.AsyncClient, prompt: str = PROMPT, headers: dict[str, str] = AUTH, **fields: Any
) -> dict[str, Any]:
    """One ``POST /run`` that must succeed: its body. RuntimeError otherwise."""
    response = await post_run(client, prompt, headers, **fields)
    body = response.json() if response.headers.get("content-type", "").endswith("json") else {}
    if response.status_code != 200 or body.get("success") is not True:
        raise RuntimeError(f"a run failed: {response.status_code} {response.text[:300]}")
    return dict(body)


async def run_outcome(client: httpx.AsyncClient) -> str:
    """One ``POST /run``, named: "200 success", "200 failure", the status, or "error <type>"."""
    try:
        response = await post_run(client)
    except httpx.HTTPError as exc:
        return f"error {type(exc).__name__}"
    if response.status_code == 200:
        return "200 success" if response.json().get("success") is True else "200 failure"
    return str(response.status_code)


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    """The seconds ``await call()`` took."""
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def samples(
    call: Callable[[], Awaitable[object]], count: int, warmup: int = 10
) -> list[float]:
    """``count`` timings of ``call``, one after another, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        await call()
    return [await timed(call) for _ in range(count)]


async def ignore(_event: object) -> None:
    """An ``on_event`` for agent turns whose events are not looked at."""


@asynccontextmanager
async def model_proxy(env: dict[str, str]) -> AsyncIterator[ModelProxy]:
    """A model proxy as the service with ``env`` runs one (its upstream and credential, its
    sockets in ``DATA_DIR/run``), serving until leaving: agents made outside the service hold
    no credential of their own and reach the model API through it, as the service's do."""
    run_dir = Path(env.get("DATA_DIR", "data")).absolute() / "run"
    credential = UpstreamCredential.for_service(env, env.get("USE_CLAUDE_API_KEY") == "1")
    proxy = ModelProxy(run_dir, upstream_url(env), credential, UsageLedger())
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
            await proxy.aclose()


async def checked_turn(agent: Agent, prompt: str = PROMPT) -> None:
    """One turn on a started ``agent``; RuntimeError if it failed (a failed turn is no figure)."""
    result = await agent.run_turn(prompt, ignore)
    if result.is_error:
        raise RuntimeError(f"direct turn failed: {result.text[:200]}")


class Direct:
    """Agents made exactly as the service makes them, without the service.

    Same launcher, sandbox decision, options and agent class
    (``tests.support.harness.service_agents``), reaching the model through ``proxy`` (see
    :func:`model_proxy`). Their homes live under ``homes``; each agent is closed by its
    caller (:meth:`close`).
    """

    def __init__(self, env: dict[str, str], homes: Path, proxy: ModelProxy | None = None) -> None:
        self.settings, self.make_agent = service_agents(env, proxy)
        self.homes = homes
        self.count = 0

    def agent(self, **spec: Any) -> Agent:
        """A new agent (``spec``: AgentSpec's fields; default: ephemeral, a one-shot's)."""
        self.count += 1
        home = spec.pop("home", None) or self.homes / f"direct-{self.count}"
        spec.setdefault("ephemeral", True)
        return self.make_agent(AgentSpec(name=home.name, home=home, **spec))

    async def warm(self, **spec: Any) -> tuple[float, Agent]:
        """(seconds ``start()`` took, the started agent)."""
        agent = self.agent(**spec)
        took = await timed(lambda: agent.start(self.settings.warmup_timeout_s))
        return took, agent

    @staticmethod
    async def turn(agent: Agent, prompt: str = PROMPT) -> float:
        """The seconds one turn on a started ``agent`` took; RuntimeError if it failed."""
        started = time.perf_counter()
        with trio.fail_after(HTTP_TIMEOUT_S):
            result = await agent.run_turn(prompt, ignore)
        if result.is_error:
            raise RuntimeError(f"direct turn failed: {result}")
        return time.perf_counter() - started

    @staticmethod
    async def close(agent: Agent) -> None:
        with trio.move_on_after(10):
            await agent.close()


# --- side by side with the original (bench/original.py) -----------------------------------


@asynccontextmanager
async def launch_sides(
    sides: list[str],
    build: OriginalBuild | None,
    env_of: Callable[[str, Path], dict[str, str]],
    where: Path,
) -> AsyncIterator[dict[str, RunningService]]:
    """Both services up at once (ours, and the original when ``build``), each with
    ``env_of(side, its directory)``; stopped gracefully on leaving."""
    async with AsyncExitStack() as stack:
        services: dict[str, RunningService] = {}
        for side in sides:
            at = where / side
            services[side] = await stack.enter_async_context(
                launch(side, build, env_of(side, at), at, start_timeout_s=START_TIMEOUT_S)
            )
        yield services
        for service in services.values():
            await service.stop(timeout_s=STOP_TIMEOUT_S)


def print_side_by_side(
    table: SideBySide, notes: str, build: OriginalBuild | str, verdict: str, run_started: float
) -> None:
    """The end of a side-by-side run: the table, ``notes``, why the original was skipped
    (when it was), the quiet-machine verdict and how long the run took."""
    section("side by side: ours vs the original")
    print("\n".join(table.table()))
    print(notes)
    if isinstance(build, str):
        print(f"  {build}")
    print(f"{verdict}; nproc={os.cpu_count()}; run took {time.perf_counter() - run_started:.0f} s")
