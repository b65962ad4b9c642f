"""What claude-agent-sdk drops, read from the SDK's own internals — on the pinned version only.

The one place the service reaches past the SDK's public API for a message's
content. At import it checks the installed ``claude_agent_sdk.__version__``
against :data:`PINNED_SDK_VERSION` (pyproject.toml's pin):

- on that version, :func:`receive_messages_with_raw` runs the SDK's own receive
  loop (``ClaudeSDKClient.receive_messages``: ``client._query.receive_messages()``
  and ``claude_agent_sdk._internal.message_parser.parse_message``) and hands out
  each message with the CLI's JSON of it;
- on any other version it uses the public ``client.receive_messages()`` and
  hands out an empty dict beside each message, and logs once why. The service
  then costs a turn by the growth of ``total_cost_usd`` (``SdkAgent._own_cost``),
  and a resumed conversation's first turn has no known cost.

tests/contract/test_sdk_contract.py pins the private parts used and shows the upstream
gap below (``test_upstream_*``): it fails once a release fixes it, and then this
module goes.

Upstream report (for anthropics/claude-agent-sdk-python)
--------------------------------------------------------
**ResultMessage drops the CLI's ``model_usage_since_last_result``**

Claude Code's ``result`` message carries ``total_cost_usd`` and ``modelUsage``,
which are the conversation's running totals: they grow turn after turn, a
process started with ``--resume`` continues from the total in the transcript,
and ``/clear`` resets them to 0. The same message carries
``model_usage_since_last_result`` — per model, the ``modelUsage`` fields
(``inputTokens``, ``outputTokens``, ``costUSD``, ...) for this result alone:
the only figure of what this turn cost. The SDK's message parser builds
``ResultMessage`` from a fixed list of keys and drops the rest; ``ResultMessage``
(0.2.188) has no field for it, and the public API gives no way to read the raw
message.

Why it matters: an application that bills or meters per turn can only take
the difference of successive ``total_cost_usd`` values. That fails for the first
turn of a resumed conversation (the first total of the new process already
includes every earlier turn: it would bill the whole conversation again) and
needs care after ``/clear`` and interrupted turns. ``model_usage_since_last_result``
answers it directly.

Proposed change: add ``model_usage_since_last_result: dict[str, ModelUsage] | None``
to ``ResultMessage``, filled from the key of that name as ``model_usage`` is from
``modelUsage``. More generally, keep the keys the parser does not know in an
extra dict on each message (e.g. ``raw: dict[str, Any]``), so a field the CLI
adds is reachable before the SDK models it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import attrs
import claude_agent_sdk
from claude_agent_sdk import ClaudeSDKClient, CLIConnectionError, Message

log = logging.getLogger(__name__)

# The claude-agent-sdk release whose internals this module was written against and
# tests/contract/test_sdk_contract.py pins; pyproject.toml pins the same (a test keeps them equal).
PINNED_SDK_VERSION = "0.2.188"

Parser = Callable[[dict[str, Any]], Message | None]


@attrs.frozen
class _Reader:
    """How messages are read: the SDK's parser (pinned version), or why not."""

    version: str
    parse: Parser | None


def reader_for(version: str) -> _Reader:
    """The reader for an installed SDK ``version``: the private parser only on the pinned one."""
    if version != PINNED_SDK_VERSION:
        return _Reader(version=version, parse=None)
    from claude_agent_sdk._internal.message_parser import parse_message

    return _Reader(version=version, parse=parse_message)


_reader = reader_for(claude_agent_sdk.__version__)
_fallback_told = False


async def receive_messages_with_raw(
    client: ClaudeSDKClient,
) -> AsyncGenerator[tuple[Message, dict[str, Any]], None]:
    """``client.receive_messages()``, each message with the CLI's JSON of it.

    The JSON is ``{}`` when the installed SDK is not the pinned one (see the
    module's docstring). Error handling: as ``client.receive_messages()``
    (``CLIConnectionError`` when the client is not connected). Resource handling:
    closing it closes the SDK's private generator it reads (on the pinned version).
    """
    parse = _reader.parse
    if parse is None:
        _tell_fallback()
        async for message in client.receive_messages():
            yield message, {}
        return
    query = client._query
    if query is None:
        raise CLIConnectionError("Not connected. Call connect() first.")
    async with aclosing(query.receive_messages()) as raw:
        async for data in raw:
            parsed = parse(data)
            if parsed is not None:
                yield parsed, data


def cost_since_last_result(raw: dict[str, Any]) -> float | None:
    """The turn's own cost in a result's JSON: the sum of ``costUSD`` in its
    ``model_usage_since_last_result`` (None: absent, as from an SDK not pinned)."""
    by_model = raw.get("model_usage_since_last_result")
    if not isinstance(by_model, dict):
        return None
    total = 0.0
    for usage in by_model.values():
        cost = usage.get("costUSD") if isinstance(usage, dict) else None
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            total += cost
    return total


def _tell_fallback() -> None:
    global _fallback_told
    if _fallback_told:
        return
    _fallback_told = True
    log.warning(
        "claude-agent-sdk %s is installed, not %s: results' model_usage_since_last_result "
        "is not read; a turn's costUsd is the growth of the CLI's running total_cost_usd "
        "(null for the first turn of a resumed conversation)",
        _reader.version,
        PINNED_SDK_VERSION,
    )
