"""What the demo's model stand-in says: scripted, deterministic answers from the request alone.

The real CLI sends the whole conversation with every call, as it does to Anthropic's API,
so the stand-in needs no memory of its own to seem to have one:

* "my name is Ada" (in any earlier user message) → "What is my name?" answers "Ada";
* a command in backquotes ("Run `uname -a`"), "list the files" or "what date/time is it"
  → a Bash tool call (``ls -la``, ``date``); the CLI runs it and sends its output back,
  and the answer quotes it;
* simple arithmetic ("What is 6*7?") → the result;
* anything else → what was said, and what to try.

Error handling: none needed — every request gets a text answer (:func:`demo_answer` never
raises on odd input: missing fields read as empty).
"""

from __future__ import annotations

import re
from typing import Any

from .mock_messages_api import RecordedRequest, Step, TextReply, ToolUseReply, tool_result_text

NAME = re.compile(r"\bmy name is ([^\W\d_][\w'-]*)", re.IGNORECASE)
ASKS_NAME = re.compile(r"\b(what(?:'s| is) my name|who am i)\b", re.IGNORECASE)
QUOTED_COMMAND = re.compile(r"`([^`\n]+)`")
LIST_FILES = re.compile(r"\b(list|show)\b.*\bfiles?\b|\bls\b", re.IGNORECASE)
DATE = re.compile(r"\b(date|time)\b", re.IGNORECASE)
ARITHMETIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)")
MAX_QUOTED_OUTPUT = 2000
HINT = (
    'try "My name is Ada." then "What is my name?" in a session, "What is 6*7?", '
    '"List the files here." or "Run `uname -a`."'
)


def demo_answer(request: RecordedRequest) -> Step:
    """The stand-in's answer to one ``/v1/messages`` call."""
    results = request.tool_results()
    if results:
        return TextReply(_about_tool_output(request, results))
    prompt = _strip_reminders(request.last_user_text()).strip()
    if ASKS_NAME.search(prompt):
        names = [m[1] for text in _user_texts(request)[:-1] for m in NAME.finditer(text)]
        if names:
            return TextReply(f"Your name is {names[-1]}.")
        return TextReply('You have not told me your name yet: say "My name is ..." first.')
    if said := NAME.search(prompt):
        return TextReply(f"Nice to meet you, {said[1]}. I will remember your name.")
    command = _command_asked_for(prompt)
    if command is not None:
        return ToolUseReply(
            "Bash",
            {"command": command, "description": f"Run {command}"},
            text=f"I will run `{command}`.",
        )
    if sum_ := ARITHMETIC.search(prompt):
        return TextReply(_calculate(sum_[1], sum_[2], sum_[3]))
    return TextReply(
        f'You said: "{prompt}". (I am the demo\'s stand-in for the model, with scripted '
        f"answers: {HINT})"
    )


def _command_asked_for(prompt: str) -> str | None:
    if quoted := QUOTED_COMMAND.search(prompt):
        return quoted[1].strip()
    if LIST_FILES.search(prompt):
        return "ls -la"
    if DATE.search(prompt):
        return "date"
    return None


def _about_tool_output(request: RecordedRequest, results: list[dict[str, Any]]) -> str:
    command = _last_command(request) or "the command"
    output = _strip_reminders(tool_result_text(results[-1])).strip()
    if len(output) > MAX_QUOTED_OUTPUT:
        output = output[:MAX_QUOTED_OUTPUT] + "\n[...]"
    if results[-1].get("is_error"):
        return f"`{command}` failed:\n{output}"
    return f"`{command}` printed:\n{output}" if output else f"`{command}` printed nothing."


def _last_command(request: RecordedRequest) -> str | None:
    for message in reversed(request.messages):
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        for block in reversed(content):
            if isinstance(block, dict) and block.get("type") == "tool_use":
                command = (block.get("input") or {}).get("command")
                return command if isinstance(command, str) else None
    return None


def _user_texts(request: RecordedRequest) -> list[str]:
    """The text of each user message, in order (tool results left out)."""
    texts = []
    for message in request.messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            parts = [b.get("text", "") for b in content if isinstance(b, dict)]
            texts.append(_strip_reminders("\n".join(p for p in parts if isinstance(p, str))))
    return texts


def _strip_reminders(text: str) -> str:
    """Text without the ``<system-reminder>`` blocks the CLI adds to user messages."""
    return re.sub(r"<system-reminder>.*?</system-reminder>", "", text, flags=re.DOTALL)


def _calculate(left: str, operator: str, right: str) -> str:
    a, b = float(left), float(right)
    if operator == "+":
        value = a + b
    elif operator == "-":
        value = a - b
    elif operator in "*x×":
        value = a * b
    elif b == 0:
        return f"{left} / {right}: dividing by zero has no answer."
    else:
        value = a / b
    shown = str(int(value)) if value == int(value) and abs(value) < 1e15 else f"{value:g}"
    return f"{left} {operator} {right} = {shown}."
