"""The real bundled CLI, through the SDK under trio, with its transcripts in PostgreSQL:
a conversation resumes from the store when its local transcript is gone."""

from __future__ import annotations

import uuid

import trio
from claude_agent_sdk import ResultMessage, project_key_for_directory

from claude_code_api.demo.mock_messages_api import open_mock_api
from claude_code_api.store.database import Database
from claude_code_api.store.transcripts import PostgresTranscriptStore
from tests.postgres.support import TIMEOUT
from tests.support.real_cli import (
    CliDirs,
    open_real_cli,
    real_cli_options,
    requires_real_cli,
    run_turn,
)


@requires_real_cli
async def test_a_conversation_resumes_from_the_store_alone(database: Database, tmp_path) -> None:
    store = PostgresTranscriptStore(database)
    dirs = CliDirs.create(tmp_path)
    session_id = str(uuid.uuid4())
    with trio.fail_after(4 * TIMEOUT):
        async with open_mock_api() as api:
            first = real_cli_options(api, dirs, session_id=session_id, session_store=store)
            async with open_real_cli(first) as client:
                await run_turn(client, "My name is Alice.")
            # The SDK mirrored the CLI's transcript into the store (from its anyio tasks).
            mirrored = await store.load(
                {
                    "project_key": project_key_for_directory(str(dirs.workspace)),
                    "session_id": session_id,
                }
            )
            assert mirrored is not None and "My name is Alice." in str(mirrored)
            # As on another replica: no local transcript at all.
            assert dirs.transcripts()
            for transcript in dirs.transcripts():
                transcript.unlink()
            resumed = real_cli_options(api, dirs, resume=session_id, session_store=store)
            async with open_real_cli(resumed) as client:
                messages = await run_turn(client, "What is my name?")

    result = messages[-1]
    assert isinstance(result, ResultMessage) and not result.is_error, result
    assert result.session_id == session_id
    # The model was sent the whole conversation, materialised from PostgreSQL.
    assert "My name is Alice." in api.model_calls[-1].all_text()
