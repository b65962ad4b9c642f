"""What the supervision tree's children share, made once: channels, clients, published state.

:func:`wire` builds a :class:`Wiring` from the settings; :mod:`.supervisor` turns it into the
tree and :mod:`.service` runs it. Nothing here starts a task.

Channels: the wiring owns both ends of the singleton inboxes, so a restarted actor reads the
same inbox: ``inbox`` (the dispatcher's; HTTP and every actor send on clones),
``registry_inbox`` (the registry's; HTTP, the dispatcher and session actors),
``credentials_inbox`` (HTTP -> credentials), ``session_starts`` (dispatcher -> session
supervisor), ``reaper_inbox`` (agents -> reaper). :meth:`Wiring.close` closes them all when
the tree has ended (:class:`~claude_code_api.service.Service` calls it).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs
import trio

from .actors.claude_login import CredentialsActor, CredentialsClient
from .actors.dispatcher import Dispatcher, PoolView, SessionLimits
from .actors.reaper import REAPER_INBOX_SIZE, ReaperClient, ReaperMessage
from .actors.registry import RegistryMessage, serve_registry
from .actors.registry_client import RegistryClient
from .actors.session import SessionConfig
from .actors.turn import TurnLimits
from .actors.worker import WorkerConfig
from .agent.protocol import CLOSE_GRACE_S, AgentFactory, AgentSpec
from .agent.sandbox import EGRESS_PROXY_SOCKET, remove_conversation_files
from .agent.startup import plan_agents
from .auth.oauth import TokenEndpoint
from .auth.renewal import CredentialsVersion
from .config.ceiling import OptionCeiling
from .config.settings import Settings
from .http._hypercorn_fixes import connection_limit
from .http.app import StoreStatus, create_app
from .http.server import HttpServer
from .limits.disk_quota import DiskQuota, remove_abandoned_homes
from .limits.usage import UsageLedger, budget_refusal
from .messages import CredentialsMessage, DispatcherMessage, StartSession
from .proxy.egress import open_unix_listener
from .proxy.model import ModelProxy, UpstreamCredential, upstream_url
from .store import SessionTable, StoreUnavailable, open_store
from .store.user_paths import user_cwd, user_workspace

if TYPE_CHECKING:
    from .actors.replica_runs import ReplicaRuns
    from .actors.session_leases import SessionLeases
    from .actors.shared_memory import SharedMemory
    from .auth.shared_login import SharedLogin
    from .store.transcript_mirror import TranscriptMirror

T = TypeVar("T")

# Requests to the registry that may wait while it writes; the dispatcher never waits.
REGISTRY_INBOX_SIZE = 1024


@attrs.frozen
class Inbox(Generic[T]):
    """Both ends of one actor's inbox; senders use (clones of) ``send``."""

    send: trio.MemorySendChannel[T]
    receive: trio.MemoryReceiveChannel[T]

    @classmethod
    def open(cls, size: int | float) -> Inbox[T]:
        send, receive = trio.open_memory_channel[T](size)
        return cls(send, receive)

    def close(self) -> None:
        self.send.close()
        self.receive.close()


@attrs.define
class EgressSocket:
    """The socket sandboxed agents' egress bridge leads to: opened once, it outlives a
    restart of the task serving it (a socket file bound into a live sandbox must stay the
    same one). The model proxy keeps its own likewise."""

    path: Path
    _listener: trio.SocketListener | None = None

    def listener(self) -> trio.SocketListener:
        if self._listener is None:
            self._listener = open_unix_listener(self.path)
        return self._listener

    def close(self) -> None:
        if self._listener is not None:
            self._listener.socket.close()


@attrs.frozen
class Wiring:
    """Everything the children are built from. Frozen: a restart rebuilds actors, not this."""

    settings: Settings
    environ: Mapping[str, str]
    inbox: Inbox[DispatcherMessage]
    registry_inbox: Inbox[RegistryMessage]
    credentials_inbox: Inbox[CredentialsMessage]
    session_starts: Inbox[StartSession]
    reaper_inbox: Inbox[ReaperMessage]
    registry: RegistryClient
    store_status: StoreStatus
    pool_view: PoolView
    disk: DiskQuota  # users' quota and the service's reserve (turns, /files, the registry)
    usage: UsageLedger  # what each user and run spent, as the model proxy counts it
    model_credential: UpstreamCredential
    model_proxy: ModelProxy  # agents reach the model API through it, never holding its key
    credentials_version: CredentialsVersion
    http: HttpServer
    egress_socket: EgressSocket
    shared: SharedState  # with DATABASE_URL: what replicas share (every field None without)

    def workspace_of(self, user_id: str) -> Path | None:
        """A session agent's working directory when not in its HOME (``WORKSPACES_DIR``)."""
        s = self.settings
        if s.workspaces_dir is None:
            return None
        return user_cwd(s.data_dir, s.workspaces_dir, user_id)

    def remove_homes(self, user_ids: frozenset[str], before: float) -> int:
        """Empty the HOMEs of users with no session left, unchanged since ``before``."""
        data_dir = self.settings.data_dir
        kept = {user_workspace(data_dir, user_id).name for user_id in user_ids}
        return remove_abandoned_homes(data_dir / "users", kept, before)

    def remove_transcripts(self, user_id: str, claude_session_id: str) -> None:
        """This replica's files of the conversation, and its copy in the database (if any).

        Error handling: OSError for either (both are tried), saying which."""
        home = user_workspace(self.settings.data_dir, user_id)
        try:
            remove_conversation_files(home, claude_session_id)
        finally:
            if self.shared.transcripts is not None:
                config_dir = AgentSpec(name="", home=home, ephemeral=False).config_dir
                cwd = user_cwd(self.settings.data_dir, self.settings.workspaces_dir, user_id)
                try:
                    self.shared.transcripts.delete_blocking(config_dir, cwd, claude_session_id)
                except StoreUnavailable as exc:
                    raise OSError(f"stored transcript not deleted: {exc}") from exc

    @property
    def turn(self) -> TurnLimits:
        s = self.settings
        return TurnLimits(s.interrupt_grace_s, s.max_output_chars, self.disk, self.usage)

    @property
    def session_config(self) -> SessionConfig:
        s = self.settings
        ceiling = OptionCeiling.of(s)
        return SessionConfig(
            s.warmup_timeout_s, self.turn, s.max_sessions_per_user, ceiling, self.shared.transcripts
        )

    @property
    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(self.settings.warmup_timeout_s, self.turn, self.settings.kept_agent_s)

    @property
    def turn_stop_grace(self) -> float:
        """How long a stopped actor may take to interrupt its turn and close its agent."""
        return self.settings.interrupt_grace_s + CLOSE_GRACE_S + 1.0

    def open_session_table(self) -> SessionTable:
        """The session table: PostgreSQL's with ``DATABASE_URL``, else ``DATA_DIR``'s SQLite
        file. Blocks (run it in a thread); raises
        :class:`~claude_code_api.store.StoreUnavailable` naming the store when it cannot open.
        """
        s = self.settings
        if s.database_url is None:
            return open_store(s.data_dir)
        # Imported only here: without DATABASE_URL the service never loads psycopg.
        from .store.postgres import open_postgres_table

        table = open_postgres_table(s.database_url)
        if self.shared.session_leases is not None:
            # Fenced: a session another replica took is never saved from here.
            table.fence_owner = self.shared.session_leases.owner
        return table

    async def serve_registry(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Open the session table (in a thread: a slow disk or database must not block the
        loop, even at start-up) and serve the registry actor on it."""
        s = self.settings
        store = await trio.to_thread.run_sync(self.open_session_table)
        await serve_registry(
            store,
            self.registry_inbox.receive,
            remove_transcripts=self.remove_transcripts,
            ttl_s=s.session_ttl_s,
            on_health=self.store_status.update,
            on_count=self.store_status.count,
            sessions_in_use=self.pool_view.sessions_in_use,
            remove_homes=self.remove_homes,
            make_room=self.disk.make_room,
            task_status=task_status,
        )

    def new_credentials_actor(self) -> CredentialsActor:
        s = self.settings
        return CredentialsActor(
            self.credentials_inbox.receive,
            environ=self.environ,
            use_api_key=s.use_claude_api_key,
            endpoint=TokenEndpoint(s.claude_oauth_token_url),
            version=self.credentials_version,
            refresh_margin_s=s.oauth_refresh_margin_s,
            on_login=self.model_credential.update,
            shared=self.shared.shared_login,
        )

    def new_dispatcher(self) -> Dispatcher:
        s = self.settings
        return Dispatcher(
            self.inbox.receive,
            pool_size=s.pool_size,
            queue_max=s.queue_max,
            queue_max_per_user=s.user_queue_max,
            session_starter=self.session_starts.send,
            registry=self.registry_inbox.send,
            session_limits=SessionLimits(
                s.max_live_sessions, s.session_queue_max, s.session_idle_s
            ),
            view=self.pool_view,
            max_running_per_user=s.running_per_user_max,
            refusal_for=partial(budget_refusal, self.usage),
            kept_max=s.kept_agents_max,
            reuse_s=s.kept_agent_s or None,
        )

    def close(self) -> None:
        for inbox in (
            self.inbox,
            self.registry_inbox,
            self.credentials_inbox,
            self.session_starts,
            self.reaper_inbox,
        ):
            inbox.close()
        self.egress_socket.close()
        if self.shared.close is not None:
            self.shared.close()


def wire(settings: Settings, environ: Mapping[str, str]) -> Wiring:
    """Make the channels, clients and shared state of a service with ``settings``."""
    inbox = Inbox[DispatcherMessage].open(0)
    registry_inbox = Inbox[RegistryMessage].open(REGISTRY_INBOX_SIZE)
    credentials_inbox = Inbox[CredentialsMessage].open(0)
    usage = UsageLedger(settings.user_daily_budget_usd)
    credential = UpstreamCredential.for_service(environ, settings.use_claude_api_key)
    proxy = ModelProxy(
        settings.data_dir.absolute() / "run", upstream_url(environ), credential, usage
    )
    registry = RegistryClient(registry_inbox.send)
    store_status, pool_view = StoreStatus(), PoolView()
    disk = DiskQuota.from_settings(settings, partial(user_workspace, settings.data_dir))
    on_health = partial(store_status.update, source="database")
    shared = _shared_state(settings, inbox.send, on_health, pool_view)
    app = create_app(
        settings,
        inbox.send,
        registry,
        store_status,
        CredentialsClient(credentials_inbox.send),
        pool_view,
        usage,
        proxy,
        disk,
        shared.replica_runs,
        shared.shared_memory,
    )
    http = HttpServer(
        app,
        settings.host,
        settings.port,
        graceful_timeout=5.0,
        max_connections=connection_limit(settings.pool_size + settings.max_live_sessions),
    )
    return Wiring(
        settings=settings,
        environ=environ,
        inbox=inbox,
        registry_inbox=registry_inbox,
        credentials_inbox=credentials_inbox,
        session_starts=Inbox[StartSession].open(settings.max_live_sessions),
        reaper_inbox=Inbox[ReaperMessage].open(REAPER_INBOX_SIZE),
        registry=registry,
        store_status=store_status,
        pool_view=pool_view,
        disk=disk,
        usage=usage,
        model_credential=credential,
        model_proxy=proxy,
        credentials_version=CredentialsVersion(),
        http=http,
        egress_socket=EgressSocket(settings.data_dir.absolute() / "run" / EGRESS_PROXY_SOCKET),
        shared=shared,
    )


@attrs.frozen
class SharedState:
    """What replicas on one PostgreSQL share (``DATABASE_URL``), all on one pool; every field
    None without a database."""

    transcripts: TranscriptMirror | None = None  # sessions' transcripts
    session_leases: SessionLeases | None = None  # which replica serves a session
    shared_login: SharedLogin | None = None  # one Claude login for every replica
    replica_runs: ReplicaRuns | None = None  # the runs every replica sees
    shared_memory: SharedMemory | None = None  # the users' CLAUDE.md
    close: Callable[[], None] | None = None  # closes the pool


def _shared_state(
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    on_health: Callable[[str | None], None],
    pool_view: PoolView,
) -> SharedState:
    """With ``DATABASE_URL``: what replicas share, on one pool (opened at first use); else
    nothing (psycopg and the SDK are not imported)."""
    url = settings.database_url
    if url is None:
        return SharedState()
    from .actors.replica_runs import ReplicaRuns
    from .actors.session_leases import SessionLeases
    from .actors.shared_memory import SharedMemory
    from .store.claude_login import PostgresLogin
    from .store.leases import new_owner
    from .store.transcript_mirror import OnDemandDatabase, TranscriptMirror

    database = OnDemandDatabase(url)
    # A root service's agents are AGENT_UID (startup.py): the files written for them too.
    owner = (settings.agent_uid, settings.agent_uid) if os.geteuid() == 0 else None
    # A session start waits for another replica's lease up to two of its terms: the
    # holder hands over at its turn's end, or dies and its lease expires.
    ttl = settings.session_lease_s
    replica = new_owner()  # (its runs are listed under the id its leases are held under)
    leases = SessionLeases(
        database, url, replica, ttl, dispatcher, wait_s=2 * ttl + 5, on_health=on_health
    )
    login = PostgresLogin(database, url)
    runs = ReplicaRuns(database, url, replica, ttl, pool_view, dispatcher)
    memory = SharedMemory(database, url, replica, settings.data_dir, dispatcher)
    return SharedState(
        transcripts=TranscriptMirror(database, owner),
        session_leases=leases,
        shared_login=login,
        replica_runs=runs,
        shared_memory=memory,
        close=database.close,
    )


def make_agent_factory(w: Wiring) -> AgentFactory:
    """Decide how agents launch, and make them. Blocking (imports the SDK): run in a thread.

    Raises :class:`~claude_code_api.agent.startup.StartupError` when agents cannot be launched
    as configured.
    """
    plan = plan_agents(w.settings, w.environ)
    import trio.testing  # noqa: F401  (for the workers: see worker.after_the_reply)

    from .agent.sdk import AgentOptions, SdkAgentFactory  # the SDK's import: ~0.6 s

    # What start-up made (modules, classes, the SDK's types: ~100 000 objects) lives as
    # long as the process: out of the collector's sight, a full collection takes ~1 ms
    # instead of ~60 ms, paid by whichever requests are in flight when it comes. Once per
    # process: after a restart of the agent side, what is alive is requests' (and the
    # garbage the import left, frozen with it, is a bounded one-time cost).
    if gc.get_freeze_count() == 0:
        gc.freeze()
    return SdkAgentFactory(
        plan.launcher,
        AgentOptions(w.settings.model, w.settings.max_output_chars, w.settings.agent_warm_up_turn),
        ReaperClient(w.reaper_inbox.send),
        plan.refusal,
        w.model_proxy,
    )
