"""The supervision tree of the service, in one screen.

    root                 one_for_one, escalates (the service exits 1)
    ├── reaper           permanent  kills every agent if the service dies (a watchdog process)
    ├── reserve          permanent  holds DISK_RESERVE_MB in a file; tops it up (disk_reserve.py)
    ├── registry         permanent  owns the session records (the store)
    ├── leases           permanent  with DATABASE_URL: sessions' leases, hand-overs between replicas
    ├── runs             permanent  with DATABASE_URL: runs listed and cancelled across replicas
    ├── memory           permanent  with DATABASE_URL: other replicas' CLAUDE.md saves heard here
    ├── credentials      permanent  owns the Claude credentials file's writes; refreshes the login
    ├── model-proxy      permanent  agents' way to the model API: their tokens, the real key, usage
    ├── egress           permanent  the egress proxy sandboxed agents reach the Internet through
    ├── http             permanent  hypercorn + Quart-Trio
    └── core             permanent  rest_for_one: who starts later depends on who started earlier
        ├── dispatcher   permanent  the job queue and session scheduling (its view of the rest)
        └── agents       permanent  one_for_one; first decides how agents launch (imports the SDK)
            ├── sessions permanent  starts session actors on demand
            │   └── (user, id)  temporary  one live conversation: one Claude Code process
            └── workers  permanent  one_for_one, stopped side by side; backs off in a crash loop
                ├── worker-0  permanent  one pre-warmed Claude Code process
                └── worker-N-1

One function per child below, in that order, each over the frozen :class:`~.wiring.Wiring`
(channels, clients and shared state; who owns and closes each channel is said there).
Children start in order and stop in reverse; every (re)start builds its actor afresh, so a
restarted dispatcher knows nothing of the crashed one and everything agent-side restarts
after it (rest_for_one). HTTP answers (``/health``: ``starting``) before the SDK is imported:
``agents`` decides how agents launch in a thread (:class:`~.actors.agent_side.AgentSide`).

Stopping, one way: a child with work to finish is an actor whose ``request_stop`` its
supervisor calls (:class:`~.actors.stopping.Stoppable` gives one to a function that takes a
stop signal); it is cancelled if it has not finished within its ``shutdown_grace``. A child
with nothing to finish has no ``request_stop`` and is cancelled at once. The registry and the
reaper finish by draining their closed inbox (what is queued is written, then they end).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import trio

from .actors.agent_side import AgentSide
from .actors.reaper import serve_reaper
from .actors.session import serve_session
from .actors.session_supervisor import SessionSupervisor
from .actors.stopping import Stoppable, StopSignal
from .actors.supervision import Backoff, ChildSpec, StopOrder, Strategy, Supervisor
from .actors.worker import serve_worker
from .agent.metered import metered
from .agent.protocol import AgentFactory
from .messages import ActorId, DispatcherMessage, RunOptions, SessionKey
from .observe import metrics
from .proxy.egress import EgressPolicy, EgressProxy
from .wiring import Wiring, make_agent_factory

# OTP-style restart intensity: more than 3 restarts in 5 s is a crash loop; the
# pool then backs off 1 s, 2 s, 4 s ... up to RESTART_BACKOFF_MAX_MS between restarts.
INTENSITY, PERIOD_S = 3, 5.0


def root(w: Wiring) -> Supervisor:
    children = [reaper(w), *reserve(w), registry(w), *shared(w), credentials(w), model_proxy(w)]
    children += [egress(w), http(w), core(w)]  # core stops first: HTTP answers what it interrupts
    return Supervisor("root", children, intensity=INTENSITY, period=PERIOD_S)


def reserve(w: Wiring) -> list[ChildSpec]:
    return [] if w.disk.ballast is None else [ChildSpec("reserve", w.disk.ballast.serve)]


def shared(w: Wiring) -> list[ChildSpec]:
    """With ``DATABASE_URL``: the session leases, the runs every replica sees and the users'
    CLAUDE.md files every replica serves."""
    s = w.shared
    actors = {"leases": s.session_leases, "runs": s.replica_runs, "memory": s.shared_memory}
    return [ChildSpec(name, actor.serve) for name, actor in actors.items() if actor is not None]


def reaper(w: Wiring) -> ChildSpec:
    async def run(stop: StopSignal, *, task_status: trio.TaskStatus[None]) -> None:
        await serve_reaper(w.reaper_inbox.receive, task_status=task_status)

    return ChildSpec("reaper", actor=lambda: Stoppable(run, on_stop=w.reaper_inbox.send.close))


def registry(w: Wiring) -> ChildSpec:
    async def run(stop: StopSignal, *, task_status: trio.TaskStatus[None]) -> None:
        await w.serve_registry(task_status=task_status)

    return ChildSpec("registry", actor=lambda: Stoppable(run, on_stop=w.registry_inbox.send.close))


def credentials(w: Wiring) -> ChildSpec:
    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        await w.new_credentials_actor().serve(task_status=task_status)

    return ChildSpec("credentials", start)


def model_proxy(w: Wiring) -> ChildSpec:
    # Before the agents, which reach the model API through it; after them it stops.
    return ChildSpec("model-proxy", w.model_proxy.serve)


def egress(w: Wiring) -> ChildSpec:
    # (The model API is no host of theirs: agents reach it through the model proxy.)
    policy = EgressPolicy(w.settings.agent_egress, ())

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        await EgressProxy(policy).serve(w.egress_socket.listener(), task_status=task_status)

    return ChildSpec("egress", start)


def http(w: Wiring) -> ChildSpec:
    return ChildSpec("http", actor=lambda: w.http)  # (it keeps no state between restarts)


def core(w: Wiring) -> ChildSpec:
    children = [dispatcher(w), agents(w)]
    return ChildSpec(
        "core",
        actor=lambda: Supervisor(
            "core", children, strategy=Strategy.REST_FOR_ONE, intensity=INTENSITY, period=PERIOD_S
        ),
        shutdown_grace=math.inf,  # a supervisor stops when its children have: their graces bound it
    )


def dispatcher(w: Wiring) -> ChildSpec:
    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        await w.new_dispatcher().serve(task_status=task_status)

    return ChildSpec("dispatcher", start)


def agents(w: Wiring) -> ChildSpec:
    def children(new_agent: AgentFactory) -> list[ChildSpec]:
        if w.settings.metrics:
            new_agent = metered(new_agent)  # innermost: counts every agent's start
        return [sessions(w, new_agent), workers(w, new_agent)]

    def new() -> AgentSide:
        return AgentSide(partial(make_agent_factory, w), children, INTENSITY, PERIOD_S)

    return ChildSpec("agents", actor=new, shutdown_grace=math.inf)


def sessions(w: Wiring, new_agent: AgentFactory) -> ChildSpec:
    async def run_session(
        key: SessionKey,
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
        stop: StopSignal,
        actor: ActorId,
        options: RunOptions,
    ) -> None:
        home = w.disk.home_of(key.user_id)
        # With several replicas, the session is live here only under its lease.
        leases, memory = w.shared.session_leases, w.shared.shared_memory
        # (``dispatcher`` closed here too: serve_session, which closes it, may never start.)
        async with dispatcher, nullcontext() if leases is None else leases.hold(key):
            if memory is not None:  # the CLI reads the user's CLAUDE.md at its start
                await memory.before_session(key.user_id)
            await serve_session(
                key, w.session_config, dispatcher, w.registry, new_agent, home, stop, actor,
                w.credentials_version, options, w.workspace_of(key.user_id),
            )  # fmt: skip

    def new() -> SessionSupervisor:
        return SessionSupervisor(w.session_starts.receive, w.inbox.send, run_session)

    return ChildSpec("sessions", actor=new, shutdown_grace=w.turn_stop_grace)


def workers(w: Wiring, new_agent: AgentFactory) -> ChildSpec:
    # POOL_SIZE workers warm an agent for anyone at once; the spares beyond them start
    # dormant (no process) until the dispatcher wakes one: a job took an agent, or one was
    # kept for its user (AGENT_REUSE_MAX).
    s = w.settings
    count = s.pool_size + s.spare_workers
    specs = [worker(w, f"worker-{n}", new_agent, dormant=n >= s.pool_size) for n in range(count)]
    backoff = Backoff(min(1.0, s.restart_backoff_max_s), 2.0, s.restart_backoff_max_s)
    on_restart = metrics.worker_restarted if s.metrics else None

    def new() -> Supervisor:
        return Supervisor(
            "workers", specs, intensity=INTENSITY, period=PERIOD_S, backoff=backoff,
            stop_order=StopOrder.TOGETHER, on_restart=on_restart,
        )  # fmt: skip

    return ChildSpec("workers", actor=new, shutdown_grace=w.turn_stop_grace)


def worker(w: Wiring, worker_id: str, new_agent: AgentFactory, *, dormant: bool) -> ChildSpec:
    homes = w.settings.data_dir / "workers" / worker_id

    async def run(stop: StopSignal, *, task_status: trio.TaskStatus[None]) -> None:
        inbox = w.inbox.send.clone()  # (each incarnation its own: it closes it when it ends)
        await serve_worker(
            worker_id, w.worker_config, inbox, new_agent, homes, stop, dormant=dormant,
            credentials=w.credentials_version, task_status=task_status,
        )  # fmt: skip

    return ChildSpec(worker_id, actor=lambda: Stoppable(run), shutdown_grace=w.turn_stop_grace)
