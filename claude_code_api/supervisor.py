"""The supervision tree of the service, in one screen.

    root                 one_for_one, escalates (the service exits 1)
    ├── reaper           permanent  kills every agent if the service dies (a watchdog process)
    ├── reserve          permanent  holds DISK_RESERVE_MB in a file; tops it up (disk_reserve.py)
    ├── registry         permanent  owns the SQLite session records
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

Children start in that order and stop in reverse. HTTP answers (``/health``:
``starting``) before the SDK is even imported: the ``agents`` supervisor decides
how agents are launched (sandbox probe, root and credential checks, the SDK's
~1 s import) in a thread, then starts the session supervisor and the workers;
a configuration that cannot work (``AGENT_SANDBOX=on`` without a sandbox) fails
start-up from there. Every (re)start builds its actor afresh: a restarted
dispatcher knows nothing of the crashed one, so everything agent-side restarts
after it (rest_for_one) and tells the new one who they are. HTTP, the registry,
the credentials actor and the reaper hold no state about the others, so a crash
there restarts only them. When the credentials change, the credentials actor
bumps ``credentials_version``; idle agents then restart (see ``renewal.py``).

Channels: the tree owns both ends of the singleton inboxes, so a restarted
actor reads the same inbox: ``inbox`` (the dispatcher's; HTTP and every actor
send on clones), ``registry_inbox`` (the registry's; HTTP, the dispatcher and
session actors), ``credentials_inbox`` (HTTP -> credentials), ``session_starts``
(dispatcher -> session supervisor), ``reaper_inbox`` (agents -> reaper).
:meth:`Service.run` closes them when the tree ends.

Shutdown (:meth:`Service.shutdown`): the dispatcher refuses new jobs, running
ones get ``SHUTDOWN_GRACE_S`` to finish, then the tree stops in reverse: workers
(side by side) and sessions interrupt what still runs (those requests are
answered with their partial output) and close their agents; then the
dispatcher, HTTP, the registry (which writes what is queued and closes the
database) and last the reaper.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Callable, Mapping
from functools import partial

import trio

from . import metrics
from .actors.credentials import CredentialsActor, CredentialsClient
from .actors.dispatcher import Dispatcher, PoolView, SessionLimits
from .actors.reaper import REAPER_INBOX_SIZE, ReaperClient, serve_reaper
from .actors.registry import RegistryClient, open_store, serve_registry, user_workspace
from .actors.session import SessionConfig, serve_session
from .actors.session_supervisor import SessionSupervisor
from .actors.stopping import StopSignal
from .actors.turn import TurnLimits
from .actors.worker import WorkerConfig, serve_worker
from .agent import CLOSE_GRACE_S, AgentFactory
from .ceiling import OptionCeiling
from .config import Settings
from .disk_quota import DiskQuota, remove_abandoned_homes
from .egress import EgressPolicy, EgressProxy, open_unix_listener
from .http.app import StoreStatus, create_app
from .http.connections import connection_limit
from .http.server import HttpServer
from .messages import (
    ActorId,
    CredentialsMessage,
    DispatcherMessage,
    Drain,
    JobFailed,
    RunOptions,
    SessionKey,
)
from .metered_agent import metered
from .model_proxy import ModelProxy, UpstreamCredential, keep_memory_private, upstream_url
from .oauth import TokenEndpoint
from .renewal import CredentialsVersion, retired_when_stale
from .sandbox import EGRESS_PROXY_SOCKET, remove_conversation_files
from .startup import plan_agents
from .supervision import Backoff, ChildSpec, StopOrder, Strategy, Supervisor
from .usage import UsageLedger

log = logging.getLogger(__name__)

# OTP-style restart intensity: more than 3 restarts in 5 s is a crash loop; the
# pool then backs off 1 s, 2 s, 4 s ... up to RESTART_BACKOFF_MAX_MS between restarts.
INTENSITY, PERIOD_S = 3, 5.0
# Requests to the registry that may wait while it writes; the dispatcher never waits.
REGISTRY_INBOX_SIZE = 1024


class Service:
    """The whole service: build the tree, run it, shut it down gracefully."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        metrics.set_enabled(settings.metrics)
        metrics.set_per_user(settings.metrics_per_user)
        self.inbox, self._inbox_receive = trio.open_memory_channel[DispatcherMessage](0)
        self.registry_inbox, self._registry_receive = trio.open_memory_channel(REGISTRY_INBOX_SIZE)
        self.session_starts, self._session_starts_receive = trio.open_memory_channel(
            settings.max_live_sessions
        )
        self.reaper_inbox, self._reaper_receive = trio.open_memory_channel(REAPER_INBOX_SIZE)
        self.credentials_inbox, self._credentials_receive = trio.open_memory_channel[
            CredentialsMessage
        ](0)
        self.credentials_version = CredentialsVersion()
        # What each user and run spent, as the model proxy counts it; the daily budget.
        self.usage = UsageLedger(settings.user_daily_budget_usd)
        # Agents reach the model API through it, never holding its credential (model_proxy.py).
        self.model_credential = UpstreamCredential.for_service(
            self.environ, settings.use_claude_api_key
        )
        self.model_proxy = ModelProxy(
            settings.data_dir.absolute() / "run",
            upstream_url(self.environ),
            self.model_credential,
            self.usage,
        )
        self._channels = (
            self.inbox,
            self._inbox_receive,
            self.registry_inbox,
            self._registry_receive,
            self.session_starts,
            self._session_starts_receive,
            self.reaper_inbox,
            self._reaper_receive,
            self.credentials_inbox,
            self._credentials_receive,
        )
        self.registry = RegistryClient(self.registry_inbox)
        self.store_status = StoreStatus()
        self.pool_view = PoolView()
        # The users' disk quota and the service's reserve (its ballast file), shared by
        # turns, /files and the registry (which asks it for room when the disk is full).
        self.disk = DiskQuota.from_settings(settings, partial(user_workspace, settings.data_dir))
        self.http = HttpServer(
            create_app(
                settings,
                self.inbox,
                self.registry,
                self.store_status,
                CredentialsClient(self.credentials_inbox),
                self.pool_view,
                self.usage,
                self.model_proxy,
                self.disk,
            ),
            settings.host,
            settings.port,
            graceful_timeout=5.0,
            max_connections=connection_limit(settings.pool_size + settings.max_live_sessions),
        )
        self.root: Supervisor | None = None
        self._stopping = False
        # The socket sandboxed agents' egress bridge leads to: opened once, it outlives a
        # restart of the task serving it (a socket file bound into a live sandbox must
        # stay the same one). The model proxy keeps its own likewise.
        self._egress_listener: trio.SocketListener | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the tree until it is stopped (returns) or escalates (raises).

        Raises :class:`~claude_code_api.startup.StartupError` during start-up
        when agents cannot be launched as configured.
        """
        if not keep_memory_private():
            log.warning(
                "cannot make the service non-dumpable: agents of its own OS user may "
                "read its environment (the model API's key) in /proc"
            )
        try:
            self.root = self._tree()
            if self._stopping:  # a signal arrived before the tree existed
                self.root.request_stop()
            await self.root.run(task_status=task_status)
        finally:
            for channel in self._channels:
                channel.close()
            with trio.CancelScope(shield=True):
                await self.model_proxy.aclose()
            if self._egress_listener is not None:
                self._egress_listener.socket.close()

    def _agent_factory(self) -> AgentFactory:
        """Decide how agents launch, and make them. Blocking (imports the SDK): run in a thread."""
        plan = plan_agents(self.settings, self.environ)
        import trio.testing  # noqa: F401  (for the workers: see worker.after_the_reply)

        from .sdk_agent import AgentOptions, SdkAgentFactory  # the SDK's import: ~0.6 s

        # What start-up made (modules, classes, the SDK's types: ~100 000 objects) lives as
        # long as the process: out of the collector's sight, a full collection takes ~1 ms
        # instead of ~60 ms, paid by whichever requests are in flight when it comes. Once per
        # process: after a restart of the agent side, what is alive is requests' (and the
        # garbage the import left, frozen with it, is a bounded one-time cost).
        if gc.get_freeze_count() == 0:
            gc.freeze()
        return SdkAgentFactory(
            plan.launcher,
            AgentOptions(
                self.settings.model,
                self.settings.max_output_chars,
                self.settings.agent_warm_up_turn,
            ),
            ReaperClient(self.reaper_inbox),
            plan.refusal,
            self.model_proxy,
        )

    def _tree(self) -> Supervisor:
        settings = self.settings
        disk = self.disk
        # The runs' usage as the model proxy counts it, and the users' budgets.
        ledger = self.usage
        turn = TurnLimits(settings.interrupt_grace_s, settings.max_output_chars, disk, ledger)
        turn_stop_grace = settings.interrupt_grace_s + CLOSE_GRACE_S + 1.0

        async def start_reaper(*, task_status: trio.TaskStatus[None]) -> None:
            await serve_reaper(self._reaper_receive, task_status=task_status)

        async def start_registry(*, task_status: trio.TaskStatus[None]) -> None:
            # Opened in a thread: a slow disk must not block the loop, even at start-up.
            store = await trio.to_thread.run_sync(open_store, settings.data_dir)
            await serve_registry(
                store,
                self._registry_receive,
                remove_transcripts=remove_transcripts,
                ttl_s=settings.session_ttl_s,
                on_health=self.store_status.update,
                on_count=self.store_status.count,
                sessions_in_use=self.pool_view.sessions_in_use,
                remove_homes=remove_homes,
                make_room=disk.make_room,
                task_status=task_status,
            )

        async def start_credentials(*, task_status: trio.TaskStatus[None]) -> None:
            actor = CredentialsActor(
                self._credentials_receive,
                environ=self.environ,
                use_api_key=settings.use_claude_api_key,
                endpoint=TokenEndpoint(settings.claude_oauth_token_url),
                version=self.credentials_version,
                refresh_margin_s=settings.oauth_refresh_margin_s,
                on_login=self.model_credential.update,
            )
            await actor.serve(task_status=task_status)

        async def start_egress(*, task_status: trio.TaskStatus[None]) -> None:
            if self._egress_listener is None:
                run = settings.data_dir.absolute() / "run"
                self._egress_listener = open_unix_listener(run / EGRESS_PROXY_SOCKET)
            # (The model API is no host of theirs: agents reach it through the model proxy.)
            proxy = EgressProxy(EgressPolicy(settings.agent_egress, ()))
            await proxy.serve(self._egress_listener, task_status=task_status)

        def remove_homes(user_ids: frozenset[str], before: float) -> int:
            kept = {user_workspace(settings.data_dir, user_id).name for user_id in user_ids}
            return remove_abandoned_homes(settings.data_dir / "users", kept, before)

        def remove_transcripts(user_id: str, claude_session_id: str) -> None:
            home = user_workspace(settings.data_dir, user_id)
            remove_conversation_files(home, claude_session_id)

        async def start_dispatcher(*, task_status: trio.TaskStatus[None]) -> None:
            dispatcher = Dispatcher(
                self._inbox_receive,
                pool_size=settings.pool_size,
                queue_max=settings.queue_max,
                queue_max_per_user=settings.user_queue_max,
                session_starter=self.session_starts,
                registry=self.registry_inbox,
                session_limits=SessionLimits(
                    max_live=settings.max_live_sessions,
                    per_session_max=settings.session_queue_max,
                    idle_s=settings.session_idle_s,
                ),
                view=self.pool_view,
                max_running_per_user=settings.running_per_user_max,
                refusal_for=partial(budget_refusal, ledger),
                kept_max=settings.kept_agents_max,
            )
            await dispatcher.serve(task_status=task_status)

        session_config = SessionConfig(
            settings.warmup_timeout_s,
            turn,
            settings.max_sessions_per_user,
            ceiling=OptionCeiling.of(settings),
        )
        worker_config = WorkerConfig(settings.warmup_timeout_s, turn, settings.kept_agent_s)

        def agent_side(new_agent: AgentFactory) -> list[ChildSpec]:
            """The session supervisor and the worker pool, once agents can be made."""
            if settings.metrics:
                new_agent = metered(new_agent)  # innermost: counts every agent's start

            async def run_session(
                key: SessionKey,
                dispatcher: trio.MemorySendChannel[DispatcherMessage],
                stop: StopSignal,
                actor: ActorId,
                options: RunOptions,
            ) -> None:
                home = user_workspace(settings.data_dir, key.user_id)
                await serve_session(
                    key,
                    session_config,
                    dispatcher,
                    self.registry,
                    new_agent,
                    home,
                    stop,
                    actor,
                    self.credentials_version,
                    options,
                )

            def new_session_supervisor() -> SessionSupervisor:
                return SessionSupervisor(self._session_starts_receive, self.inbox, run_session)

            # A worker's process is retired when it waits for a job with stale credentials
            # (also one kept for its user's next job, which waits the same way).
            new_worker_agent = retired_when_stale(new_agent, self.credentials_version)

            def worker_spec(worker_id: str, *, dormant: bool) -> ChildSpec:
                homes = settings.data_dir / "workers" / worker_id
                stop = _CurrentStop()

                async def start(*, task_status: trio.TaskStatus[None]) -> None:
                    await serve_worker(
                        worker_id,
                        worker_config,
                        self.inbox.clone(),
                        new_worker_agent,
                        homes,
                        stop.fresh(),
                        dormant=dormant,
                        task_status=task_status,
                    )

                return ChildSpec(
                    worker_id, start, request_stop=stop.request_stop, shutdown_grace=turn_stop_grace
                )

            def new_worker_pool() -> Supervisor:
                # POOL_SIZE workers warm an agent for anyone at once; the spares beyond them
                # start dormant (no process) and are woken by the dispatcher when the pool is
                # short: a job took an agent, or one was kept for its user (AGENT_REUSE_MAX).
                workers = settings.pool_size + settings.spare_workers
                return Supervisor(
                    "workers",
                    [
                        worker_spec(f"worker-{n}", dormant=n >= settings.pool_size)
                        for n in range(workers)
                    ],
                    intensity=INTENSITY,
                    period=PERIOD_S,
                    backoff=Backoff(
                        initial=min(1.0, settings.restart_backoff_max_s),
                        factor=2.0,
                        cap=settings.restart_backoff_max_s,
                    ),
                    stop_order=StopOrder.TOGETHER,
                    on_restart=metrics.worker_restarted if settings.metrics else None,
                )

            return [
                ChildSpec("sessions", actor=new_session_supervisor, shutdown_grace=turn_stop_grace),
                ChildSpec("workers", actor=new_worker_pool, shutdown_grace=turn_stop_grace),
            ]

        def new_agents() -> _AgentSide:
            return _AgentSide(self._agent_factory, agent_side)

        def new_core() -> Supervisor:
            return Supervisor(
                "core",
                [
                    ChildSpec("dispatcher", start_dispatcher),
                    ChildSpec("agents", actor=new_agents, shutdown_grace=math.inf),
                ],
                strategy=Strategy.REST_FOR_ONE,
                intensity=INTENSITY,
                period=PERIOD_S,
            )

        reserve = [] if disk.ballast is None else [ChildSpec("reserve", disk.ballast.serve)]
        return Supervisor(
            "root",
            [
                ChildSpec("reaper", start_reaper, request_stop=self.reaper_inbox.close),
                *reserve,
                # Stopped after everything that saves, by closing its inbox: it writes
                # what is queued, then ends.
                ChildSpec("registry", start_registry, request_stop=self.registry_inbox.close),
                ChildSpec("credentials", start_credentials),
                # Before the agents, which reach the model API through it; after them it stops.
                ChildSpec("model-proxy", self.model_proxy.serve),
                ChildSpec("egress", start_egress),
                ChildSpec("http", self.http.serve, request_stop=self.http.request_stop),
                # Stopped before HTTP, so the turns it interrupts are answered. A
                # supervisor stops when its children have: their graces bound it.
                ChildSpec("core", actor=new_core, shutdown_grace=math.inf),
            ],
            intensity=INTENSITY,
            period=PERIOD_S,
        )

    async def shutdown(self, grace: float) -> None:
        """Refuse new work, give running jobs ``grace`` seconds, then stop the tree."""
        log.info("shutting down: running jobs get %gs to finish", grace)
        # Answered by HTTP itself from now on: the actors behind it are about to stop.
        self.http.refuse_new_requests()
        done_send, done_receive = trio.open_memory_channel[None](1)
        with trio.move_on_after(grace):
            async with done_receive:
                await self.inbox.send(Drain(done_send))
                try:
                    await done_receive.receive()
                except trio.EndOfChannel:
                    pass
        self._stopping = True
        if self.root is not None:
            self.root.request_stop()


def budget_refusal(ledger: UsageLedger, user_id: str) -> JobFailed | None:
    """The answer to new work of ``user_id`` when their daily budget is spent (429)."""
    if not ledger.over_budget(user_id):
        return None
    return JobFailed(429, ledger.budget_message(), retry_after_s=ledger.retry_after_s())


class _CurrentStop:
    """The stop signal of a child's current incarnation: a restart gets a fresh one.

    (A child stopped by its supervisor and then restarted — rest_for_one — must
    not start out stopped.)
    """

    def __init__(self) -> None:
        self.current = StopSignal()

    def fresh(self) -> StopSignal:
        self.current = StopSignal()
        return self.current

    def request_stop(self) -> None:
        self.current.request_stop()


class _AgentSide:
    """The ``agents`` supervisor: decides how agents launch, then runs what makes them.

    The decision (sandbox probe, start-up checks, the SDK's slow import) runs in
    a thread before anything agent-side starts, so HTTP and the dispatcher are
    already answering meanwhile. A :class:`~claude_code_api.startup.StartupError`
    raised there fails the service's start.
    """

    def __init__(
        self,
        decide: Callable[[], AgentFactory],
        children: Callable[[AgentFactory], list[ChildSpec]],
    ) -> None:
        self._decide = decide
        self._children = children
        self._supervisor: Supervisor | None = None
        self._stop_requested = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        new_agent = await trio.to_thread.run_sync(self._decide)
        self._supervisor = Supervisor(
            "agents", self._children(new_agent), intensity=INTENSITY, period=PERIOD_S
        )
        if self._stop_requested:
            self._supervisor.request_stop()
        await self._supervisor.run(task_status=task_status)

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._supervisor is not None:
            self._supervisor.request_stop()
