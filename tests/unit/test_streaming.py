"""The SSE encoding of a job's reply (``http/streaming.py``) and the options a request may ask
for (``http/requests.py``): pure functions, and the stream generator on trio's autojump clock."""

from __future__ import annotations

import json

import pytest
import trio

from claude_code_api.http import streaming
from claude_code_api.http.jobs import BACKSTOP_S, Finished
from claude_code_api.http.requests import BadRequest, OptionCeiling, parse_run_request
from claude_code_api.http.streaming import (
    KEEP_ALIVE,
    KEEP_ALIVE_S,
    event_stream,
    tool_summary,
    wants_event_stream,
)
from claude_code_api.messages import (
    AssistantText,
    JobFailed,
    JobStarted,
    Queued,
    RunOptions,
    RunResult,
    SessionIdChanged,
    ToolResult,
    ToolUse,
    UpstreamRetry,
)
from tests.collab.test_turn import make_job

LIMIT = 1000


def parse(frames: list[bytes]) -> list[tuple[str | None, str, object]]:
    """(id, event name, data) of each frame; comments as (None, ':', text).

    A chunk may hold several frames (events that arrived together go out in one write), but
    never a partial one.
    """
    events = []
    for raw in frames:
        chunk = raw.decode()
        assert chunk.endswith("\n\n"), chunk
        for text in (part + "\n\n" for part in chunk[:-2].split("\n\n")):
            events.append(_parse_frame(text))
    return events


def _parse_frame(text: str) -> tuple[str | None, str, object]:
    if text.startswith(":"):
        return (None, ":", text.strip())
    fields = dict(line.split(": ", 1) for line in text.strip().split("\n"))
    return (fields["id"], fields["event"], json.loads(fields["data"]))


def result_body(outcome: RunResult, finished: Finished, job) -> dict:
    return {"output": outcome.output, "queuedMs": finished.queued_ms(job), "runId": job.id}


async def collect(job, events, first, frames: list[bytes], ends: list) -> None:
    async def on_end(finished: Finished | None) -> None:
        ends.append(finished)

    async for chunk in event_stream(job, events, first, result_body=result_body, on_end=on_end):
        frames.append(chunk)


async def test_every_event_is_a_frame_with_a_unique_id_and_nothing_follows_the_result(
    autojump_clock,
):
    with trio.fail_after(LIMIT):
        job, events = make_job(timeout_s=600)
        for event in [
            JobStarted("w", at=2.5),
            AssistantText("hello\nworld"),
            SessionIdChanged("new"),  # not shown to clients
            ToolUse("Bash", {"command": "ls  -la\n/tmp", "timeout": 5}),
            ToolResult(ok=False),
            UpstreamRetry(529, "overloaded", attempt=1, max_retries=10),
            RunResult(success=True, output="done", duration_ms=10),
            AssistantText("after the end"),
        ]:
            job.reply.send_nowait(event)
        frames: list[bytes] = []
        ends: list = []
        await collect(job, events, Queued(3), frames, ends)
        parsed = parse(frames)
        assert [(name, data) for _, name, data in parsed] == [
            ("queued", {"runId": "job-1", "position": 3}),
            ("started", {"runId": "job-1", "queuedMs": 2500}),
            ("text", {"text": "hello\nworld"}),
            ("tool_use", {"name": "Bash", "summary": "ls -la /tmp"}),
            ("tool_result", {"ok": False}),
            (
                "upstream_retry",
                {"status": 529, "message": "overloaded", "attempt": 1, "maxRetries": 10},
            ),
            ("result", {"output": "done", "queuedMs": 2500, "runId": "job-1"}),
        ]
        ids = [event_id for event_id, _, _ in parsed]
        assert len(set(ids)) == len(ids)
        [finished] = ends
        assert finished.terminal.output == "done" and finished.started_at == 2.5


def test_a_frame_escapes_a_lone_surrogate_as_json_does():
    # Valid UTF-8 on the wire; the client's JSON parser reads back the same string.
    text = "a\ud800b \U0001f600"
    chunk = streaming.frame(7, "text", {"text": text})
    assert chunk == 'id: 7\nevent: text\ndata: {"text":"a\\ud800b \U0001f600"}\n\n'.encode()
    assert parse([chunk]) == [("7", "text", {"text": text})]


async def test_events_waiting_together_go_out_in_one_write(autojump_clock, monkeypatch):
    # A stream that fell behind catches up in one send per batch, not one per event.
    monkeypatch.setattr(streaming, "MAX_BATCH", 4)
    with trio.fail_after(LIMIT):
        job, events = make_job(timeout_s=600)
        for index in range(6):
            job.reply.send_nowait(AssistantText(f"part {index}"))
        job.reply.send_nowait(RunResult(success=True, output="done", duration_ms=10))
        frames: list[bytes] = []
        await collect(job, events, Queued(0), frames, [])
        # queued + 3 texts, then 3 texts + the result
        assert [len(parse([chunk])) for chunk in frames] == [4, 4]
        assert parse(frames)[-1][1] == "result"


async def test_a_failure_is_an_error_event(autojump_clock):
    with trio.fail_after(LIMIT):
        job, events = make_job()
        job.reply.send_nowait(JobFailed(502, "agent process exited with code 3"))
        frames: list[bytes] = []
        await collect(job, events, Queued(0), frames, [])
        assert parse(frames)[-1][1:] == (
            "error",
            {"error": "agent process exited with code 3", "status": 502, "runId": "job-1"},
        )


async def test_a_reply_closed_without_an_answer_is_a_502_error(autojump_clock):
    with trio.fail_after(LIMIT):
        job, events = make_job()
        job.reply.close()
        frames: list[bytes] = []
        await collect(job, events, Queued(0), frames, [])
        assert parse(frames)[-1][1:] == (
            "error",
            {"error": "the agent stopped without answering", "status": 502, "runId": "job-1"},
        )


async def test_silence_sends_a_keep_alive_comment_every_15_s(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        job, events = make_job(timeout_s=600)
        frames: list[bytes] = []
        ends: list = []
        nursery.start_soon(collect, job, events, Queued(0), frames, ends)
        await trio.sleep(KEEP_ALIVE_S - 0.001)
        assert frames[1:] == []
        await trio.sleep(0.002)
        assert frames[1:] == [KEEP_ALIVE]
        job.reply.send_nowait(AssistantText("x"))
        await trio.sleep(KEEP_ALIVE_S - 0.001)  # the wait starts again after an event
        assert frames[2:] == [b'id: 2\nevent: text\ndata: {"text":"x"}\n\n']
        await trio.sleep(0.002)
        assert frames[3:] == [KEEP_ALIVE]
        job.answer(RunResult(success=True, output="x", duration_ms=1))
        await trio.sleep(0)
        await trio.sleep(1)
        assert parse(frames)[-1][1] == "result" and len(ends) == 1


async def test_a_reply_that_outlives_its_deadline_ends_with_a_504(autojump_clock):
    with trio.fail_after(LIMIT):
        job, events = make_job(timeout_s=10)
        frames: list[bytes] = []
        await collect(job, events, Queued(0), frames, [])
        assert trio.current_time() == 10 + BACKSTOP_S
        assert parse(frames)[-1][1:] == (
            "error",
            {
                "error": "the job outlived its deadline without an answer",
                "status": 504,
                "runId": "job-1",
            },
        )


async def test_a_stream_closed_early_still_ends_its_run(autojump_clock):
    with trio.fail_after(LIMIT):
        job, events = make_job()
        ends: list = []

        async def on_end(finished: Finished | None) -> None:
            ends.append(finished)

        stream = event_stream(job, events, Queued(0), result_body=result_body, on_end=on_end)
        assert (await stream.__anext__()).startswith(b"id: 1\nevent: queued")
        await stream.aclose()  # the client left
        assert ends == [None]


@pytest.mark.parametrize(
    ("stream", "accept", "wanted"),
    [
        (None, None, False),
        (None, "application/json", False),
        (None, "*/*", False),
        (None, "text/event-stream", True),
        (None, "application/json, Text/Event-Stream;q=0.5", True),
        (None, "text/event-stream;q=0", False),
        (True, "application/json", True),
        (False, "text/event-stream", False),
    ],
)
def test_stream_is_asked_by_the_body_or_else_by_accept(stream, accept, wanted):
    assert wants_event_stream(stream, accept) is wanted


def test_a_tool_summary_is_one_short_line():
    assert tool_summary({"file_path": "/a/b.py", "content": "x" * 5000}) == "/a/b.py"
    assert tool_summary({}) == ""
    assert tool_summary({"todos": [1, 2]}) == '{"todos": [1, 2]}'
    long = tool_summary({"command": "echo " + "y" * 1000})
    assert len(long) == 200 and long.endswith("…")


# --- options ------------------------------------------------------------------------------

CEILING = OptionCeiling(
    allowed_models=("default-model", "other-model"),
    allowed_permission_modes=("plan", "dontAsk"),
    max_turns=10,
    max_budget_usd=2.0,
)


def options_of(fields: dict, ceiling: OptionCeiling | None = CEILING) -> RunOptions:
    body = json.dumps({"prompt": "p", **fields}).encode()
    return parse_run_request(
        body, max_prompt_chars=100, max_timeout_ms=1000, ceiling=ceiling
    ).options


def test_options_within_the_ceiling_are_accepted():
    assert options_of({}) == RunOptions()
    assert options_of({"model": None, "systemPrompt": "", "allowedTools": []}) == RunOptions()
    options = options_of(
        {
            "model": "other-model",
            "systemPrompt": "Be brief.\nVery.",
            "allowedTools": ["Read", "Bash(git:*)", "Read"],
            "disallowedTools": ["WebFetch"],
            "maxTurns": 10,
            "maxBudgetUsd": 2,
            "permissionMode": "plan",
        }
    )
    assert options == RunOptions(
        model="other-model",
        system_prompt="Be brief.\nVery.",
        allowed_tools=("Read", "Bash(git:*)"),
        disallowed_tools=("WebFetch",),
        max_turns=10,
        max_budget_usd=2.0,
        permission_mode="plan",
    )
    assert options.needs_own_process
    assert not RunOptions(model="m", permission_mode="plan").needs_own_process
    assert RunOptions.from_json(json.loads(json.dumps(options.to_json()))) == options


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "third-model"}, "model: 'third-model' is not allowed here; allowed:"),
        ({"model": ""}, "model: expected a model name"),
        ({"model": ["m"]}, "model: expected a model name"),
        ({"systemPrompt": 1}, "systemPrompt: expected a string, got number"),
        ({"systemPrompt": "a\u0000b"}, "systemPrompt: must not contain NUL"),
        ({"systemPrompt": "é" * 60_000}, "systemPrompt: exceeds 100000 bytes"),
        ({"allowedTools": "Read"}, "allowedTools: expected a list"),
        ({"allowedTools": ["Read", 3]}, "allowedTools: expected a list"),
        ({"disallowedTools": [""]}, "disallowedTools: expected a list"),
        ({"disallowedTools": ["a,b"]}, "disallowedTools: expected a list"),
        ({"disallowedTools": ["x"] * 101}, "disallowedTools: expected a list"),
        ({"maxTurns": 1.5}, "maxTurns: expected a whole number, got number"),
        ({"maxTurns": 0}, "maxTurns: expected a whole number from 1"),
        ({"maxTurns": 11}, "maxTurns: at most 10 allowed here"),
        ({"maxBudgetUsd": "1"}, "maxBudgetUsd: expected a number, got string"),
        ({"maxBudgetUsd": -1}, "maxBudgetUsd: expected a number above 0"),
        ({"maxBudgetUsd": 2.5}, "maxBudgetUsd: at most 2 allowed here"),
        ({"permissionMode": "sudo"}, "permissionMode: expected one of default, acceptEdits"),
        ({"permissionMode": "default"}, "permissionMode: 'default' is not allowed here"),
        ({"permissionMode": "bypassPermissions"}, "permissionMode: 'bypassPermissions' is not"),
        ({"stream": "yes"}, "stream: expected true or false, got string"),
    ],
)
def test_options_outside_the_ceiling_or_mistyped_are_refused_naming_them(fields, message):
    with pytest.raises(BadRequest) as refused:
        options_of(fields)
    assert refused.value.status == 400
    assert refused.value.message.startswith(message), refused.value.message


def test_without_a_ceiling_any_valid_option_is_accepted():
    options = options_of({"model": "any", "permissionMode": "bypassPermissions"}, None)
    assert (options.model, options.permission_mode) == ("any", "bypassPermissions")
