"""TranscriptMirror on real PostgreSQL and real files: what the CLI writes goes to the store
after a turn, and comes back, in the place the CLI reads it, before a resume."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest
import trio
from claude_agent_sdk import project_key_for_directory

from claude_code_api.store import StoreUnavailable
from claude_code_api.store.database import Database
from claude_code_api.store.transcript_mirror import TranscriptMirror
from claude_code_api.store.transcripts import PostgresTranscriptStore
from tests.postgres.support import TIMEOUT, TcpLink


class Place:
    """A session agent's HOME (config dir) and its workspace elsewhere, as a replica has them."""

    def __init__(self, root: Path, workspace: Path) -> None:
        self.config_dir = root / "home" / ".claude"
        self.cwd = workspace
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.session = str(uuid.uuid4())

    @property
    def project(self) -> Path:
        return self.config_dir / "projects" / project_key_for_directory(str(self.cwd))

    @property
    def transcript(self) -> Path:
        return self.project / f"{self.session}.jsonl"

    def write(self, path: Path, *entries: dict, tail: bytes = b"") -> None:
        """Append ``entries`` to ``path`` as the CLI does (then ``tail``, a partial line)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as file:
            file.write(b"".join(json.dumps(e).encode() + b"\n" for e in entries) + tail)

    def args(self) -> tuple[Path, Path, str]:
        return self.config_dir, self.cwd, self.session


def line(n: int, text: str = "") -> dict:
    return {"type": "user", "uuid": f"u{n}", "message": {"content": text or f"line {n}"}}


async def stored(database: Database, place: Place, subpath: str | None = None) -> list | None:
    key = {"project_key": project_key_for_directory(str(place.cwd)), "session_id": place.session}
    if subpath:
        key["subpath"] = subpath
    return await PostgresTranscriptStore(database).load(key)  # type: ignore[arg-type]


async def test_each_mirror_stores_the_lines_added_since_the_last(database, tmp_path) -> None:
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    mirror = TranscriptMirror(lambda: database)
    with trio.fail_after(TIMEOUT):
        place.write(place.transcript, line(1), line(2), tail=b'{"type": "us')
        await mirror.mirror(*place.args())
        assert await stored(database, place) == [line(1), line(2)]
        # The partial line waited for its end; a line without a uuid is stored once.
        with place.transcript.open("ab") as file:
            file.write(b'er", "n": 3}\n')
        place.write(place.transcript, {"type": "summary"})
        await mirror.mirror(*place.args())
        await mirror.mirror(*place.args())
    assert await stored(database, place) == [
        line(1),
        line(2),
        {"type": "user", "n": 3},
        {"type": "summary"},
    ]


async def test_subagents_transcripts_and_metadata_are_mirrored(database, tmp_path) -> None:
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    mirror = TranscriptMirror(lambda: database)
    agent = place.project / place.session / "subagents" / "agent-x1.jsonl"
    with trio.fail_after(TIMEOUT):
        place.write(place.transcript, line(1))
        place.write(agent, line(10, "sub"))
        agent.with_name("agent-x1.meta.json").write_text(json.dumps({"agentType": "explore"}))
        await mirror.mirror(*place.args())
        await mirror.mirror(*place.args())  # (the metadata, unchanged, not again)
        sub = await stored(database, place, "subagents/agent-x1")
    assert sub == [line(10, "sub"), {"agentType": "explore", "type": "agent_metadata"}]


async def test_a_resume_elsewhere_finds_the_transcript_where_the_cli_reads_it(
    database, tmp_path
) -> None:
    workspace = tmp_path / "w" / "alice"
    a = Place(tmp_path / "a", workspace)
    b = Place(tmp_path / "b", workspace)
    b.session = a.session
    agent = Path(a.session) / "subagents" / "agent-x1.jsonl"
    on_a, on_b = TranscriptMirror(lambda: database), TranscriptMirror(lambda: database)
    with trio.fail_after(TIMEOUT):
        a.write(a.transcript, line(1), line(2))
        a.write(a.project / agent, line(10))
        (a.project / agent).with_name("agent-x1.meta.json").write_text('{"agentType": "x"}')
        await on_a.mirror(*a.args())
        assert await on_b.materialise(*b.args())
        # B's next turn: only what B's CLI adds is stored.
        b.write(b.transcript, line(3))
        await on_b.mirror(*b.args())
    assert [json.loads(x) for x in b.transcript.read_text().splitlines()] == [
        line(1),
        line(2),
        line(3),
    ]
    assert json.loads((b.project / agent).read_text()) == line(10)
    assert json.loads((b.project / agent).with_name("agent-x1.meta.json").read_text()) == {
        "agentType": "x"
    }
    assert stat.S_IMODE(b.transcript.stat().st_mode) == 0o600
    assert stat.S_IMODE(b.project.stat().st_mode) == 0o700
    assert await stored(database, a) == [line(1), line(2), line(3)]


async def test_a_stale_local_transcript_is_replaced_an_unknown_one_kept(database, tmp_path) -> None:
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    mirror = TranscriptMirror(lambda: database)
    with trio.fail_after(TIMEOUT):
        place.write(place.transcript, line(1))
        # Nothing stored (a session from before DATABASE_URL): the local file stays.
        assert not await mirror.materialise(*place.args())
        assert place.transcript.read_text() == json.dumps(line(1)) + "\n"
        await mirror.mirror(*place.args())
        # Another replica ran a turn since: this replica's copy is stale.
        other = Place(tmp_path / "b", place.cwd)
        other.session = place.session
        other.write(other.transcript, line(1), line(2))
        await TranscriptMirror(lambda: database).mirror(*other.args())
        assert await mirror.materialise(*place.args())
    assert [json.loads(x) for x in place.transcript.read_text().splitlines()] == [line(1), line(2)]


async def test_a_deleted_session_leaves_nothing_stored(database, tmp_path) -> None:
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    mirror = TranscriptMirror(lambda: database)
    with trio.fail_after(TIMEOUT):
        place.write(place.transcript, line(1))
        place.write(place.project / place.session / "subagents" / "agent-1.jsonl", line(2))
        await mirror.mirror(*place.args())
        await trio.to_thread.run_sync(mirror.delete_blocking, *place.args())
        assert await stored(database, place) is None
        assert await stored(database, place, "subagents/agent-1") is None


async def test_links_the_agent_made_are_not_followed(database, tmp_path) -> None:
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    victim = Place(tmp_path / "v", tmp_path / "w" / "bob")
    victim.write(victim.project / f"{place.session}.jsonl", line(1, "bob's secret"))
    place.config_dir.mkdir(parents=True)
    (place.config_dir / "projects").symlink_to(victim.config_dir / "projects")
    (place.config_dir / "projects" / project_key_for_directory(str(place.cwd))).mkdir()
    mirror = TranscriptMirror(lambda: database)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(OSError):
            await mirror.mirror(*place.args())
        assert await stored(database, place) is None


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_database_that_does_not_answer_is_the_store_unavailable(
    database: Database, link: TcpLink, shared_url: str, tmp_path
) -> None:
    from urllib.parse import urlsplit

    from claude_code_api.store.transcript_mirror import open_transcript_mirror

    mirror, close = open_transcript_mirror(link.url(urlsplit(shared_url).path.lstrip("/")), None)
    place = Place(tmp_path / "a", tmp_path / "w" / "alice")
    place.write(place.transcript, line(1))
    try:
        with trio.fail_after(TIMEOUT):
            link.cut()
            with pytest.raises(StoreUnavailable):
                await mirror.mirror(*place.args())
            with pytest.raises(StoreUnavailable):
                await mirror.materialise(*place.args())
            link.restore()
            await mirror.mirror(*place.args())  # what failed is stored once it answers
        assert await stored(database, place) == [line(1)]
    finally:
        await trio.to_thread.run_sync(close)


def test_what_it_writes_is_the_agents_when_the_service_is_root(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give files to another uid")
    from claude_code_api.store.transcript_mirror import Conversation, _opened_project, _replace_file

    conversation = Conversation(tmp_path / "home" / ".claude", tmp_path / "w", "s1")
    owner = (65536, 65536)
    with _opened_project(conversation, make=owner) as project_fd:
        assert project_fd is not None
        _replace_file(project_fd, "s1/subagents/agent-1.jsonl", b"{}\n", owner)
    project = conversation.config_dir / "projects" / conversation.project_key
    for path in (
        conversation.config_dir.parent,
        project,
        project / "s1" / "subagents" / "agent-1.jsonl",
    ):
        assert (path.stat().st_uid, path.stat().st_gid) == owner, path
