#!/usr/bin/env python3
"""A fake of the `claude` CLI, driven by claude-agent-sdk through `cli_path`.

Standard library only. It speaks the stream-json protocol (NDJSON on stdin and
stdout), keeps transcripts like the real CLI so `--session-id` / `--resume`
are just as strict, and can inject faults on request.

Environment:
  FAKE_CLAUDE_HOME       transcripts go to $FAKE_CLAUDE_HOME/transcripts/<uuid>.jsonl;
                         unset: where the real CLI keeps them,
                         $CLAUDE_CONFIG_DIR/projects/<cwd slug>/<uuid>.jsonl (default ~/.claude)
  FAKE_CLAUDE_REFUSE_ROOT  1: refuse bypassPermissions as root unless IS_SANDBOX, as the
                         real CLI does (same message, exit 1)
  FAKE_CLAUDE_MODE       comma-separated start-up modes (see below)
  FAKE_CLAUDE_MODE_FILE  a file with more modes, re-read at every process start
  FAKE_CLAUDE_PIDDIR     an empty file <pid> is created there at start
  FAKE_CLAUDE_LOG        one JSON line per process start and per turn

Start-up modes: slow_start:S, no_init, exit_at_start:CODE, garbage_at_start.
Any per-turn directive named as a start-up mode applies to every turn (a
directive in the prompt itself wins).

Per-turn directives, written in the prompt as [[fake:NAME]] or [[fake:NAME:ARG...]]:
  slow:N:D      N assistant texts "piece 1".."piece N", D seconds apart; interruptible
  stamp:N:D     like slow, but each text is "stamp <time.monotonic()>" taken just before it
                is written (CLOCK_MONOTONIC: comparable across processes; for benchmarks)
  sleep:S       sleep S seconds (interruptible), then reply normally
  crash:CODE    one assistant text, then exit CODE (default 3) without a result
  hang          one assistant text, then never finish; ignores interrupt and stdin EOF
  hang_hard     like hang, and SIGTERM is ignored too
  garbage       a line "{this is not json", then a normal reply
  truncated     half an assistant JSON line, then exit 1
  error         an error result (subtype error_max_turns, is_error true); stays alive
  big:N         assistant texts totalling N characters of "x"
  stderr:N      N lines of noise on stderr, then a normal reply
  close_stdout  one assistant text, close stdout, exit 0 a little later
  tool          a tool_use assistant message and its tool_result, then a normal reply
  bash          run the rest of the prompt (after the directive) with /bin/sh as a Bash
                tool call; reply with its output (stdout and stderr)
  retry:S:N:D   N `api_retry` system messages for HTTP status S (0: unreachable), D seconds
                apart (interruptible; N=0: until interrupted), then an error result with
                api_error_status S, as the real CLI ends a turn whose retries ran out
  whoami        reply with what this process was asked to be, as "whoami: " and a JSON
                object: model, permissionMode (as started or as last set by a control
                request), appendSystemPrompt, allowedTools, disallowedTools, maxTurns,
                maxBudgetUsd (as the argv gave them; null when absent), pid
  memory        reply with the memory this process was given, instead of the echo:
                "memory: " and, joined by " | ", each CLAUDE.md it loaded at start as
                "<source>: <text>" (source user, project or local), then each
                <system-reminder> block a user message brought as "context: <text>";
                "memory: none" when there is none
  total_only    the result has no model_usage_since_last_result (only the running total)
  images        reply with the image blocks the user message brought: "images: " and, joined
                by ", ", "<media_type> <decoded bytes>" for each; "images: none" without any

Memory, as the real CLI has it: at start the fake reads CLAUDE.md files as the real
one does (user: $CLAUDE_CONFIG_DIR/CLAUDE.md; project: CLAUDE.md and .claude/CLAUDE.md in
the cwd and every ancestor; local: CLAUDE.local.md there too; --setting-sources picks
which, default all) and never again in that process. A user message whose content is a
list of text blocks has its prompt in the blocks that are not <system-reminder> blocks;
those are context, kept for the rest of the conversation; its image blocks are noted
(see the images directive). FAKE_CLAUDE_LOG turn records carry the memory as a list and
the images as [media_type, decoded bytes] pairs.

Control requests: initialize, interrupt (ends the running turn), set_model and
set_permission_mode (the model and mode of later turns: reported by whoami, in the
init message of each turn and, for the model, in every assistant message).

The prompt "/clear" moves the conversation to a new session id, as the real CLI
does: that turn's init and result carry the new id, and no model call is made.
--no-session-persistence keeps no transcript (the conversation lives in the process only).

Costs, as the real CLI reports them: every turn but "/clear" costs TURN_COST_USD. A
result's total_cost_usd (and modelUsage) is the conversation's running total: a process
resuming a conversation starts from the total its transcript holds, "/clear" starts again
at 0; model_usage_since_last_result holds that turn's own cost; usage is the turn's own.

The normal ("echo") reply: "My name is X." -> "Nice to meet you, X.";
"What is my name?" -> "Your name is X." from the transcript (or "I don't know
your name."); anything else -> "echo: <prompt>".
"""

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

CLI_VERSION = "2.1.331"
MODEL = "fake"
TURN_COST_USD = 0.0001
STARTUP_MODES = {"slow_start", "no_init", "exit_at_start", "garbage_at_start"}
TURN_DIRECTIVES = {
    "slow",
    "stamp",
    "sleep",
    "crash",
    "hang",
    "hang_hard",
    "garbage",
    "truncated",
    "error",
    "big",
    "stderr",
    "close_stdout",
    "tool",
    "bash",
    "retry",
    "memory",
    "whoami",
    "total_only",
    "images",
}
REMINDER_PREFIX = "<system-reminder>"
DIRECTIVE_RE = re.compile(r"\[\[fake:([^\]]*)\]\]")
NAME_RE = re.compile(r"My name is ([^.\n]+)\.")
# Flags that always take a value (two-token form consumes the next argv item).
VALUE_FLAGS = {
    "--output-format",
    "--input-format",
    "--system-prompt",
    "--system-prompt-file",
    "--append-system-prompt",
    "--tools",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--max-turns",
    "--max-budget-usd",
    "--task-budget",
    "--model",
    "--fallback-model",
    "--betas",
    "--permission-prompt-tool",
    "--permission-mode",
    "--session-id",
    "--settings",
    "--add-dir",
    "--mcp-config",
    "--setting-sources",
    "--plugin-dir",
    "--max-thinking-tokens",
    "--thinking",
    "--thinking-display",
    "--effort",
    "--json-schema",
    "--resume-session-at",
    "--resume-drops-turn",
    "--agents",
}
# Flags whose value is optional: only taken when the next item is not a flag.
OPTIONAL_VALUE_FLAGS = {"--resume": "--resume", "-r": "--resume"}

_EOF = object()


class _Out:
    """Line-oriented writer on fd 1, shared by the main and reader threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.closed = False
        self.hanging = False

    def line(self, text):
        data = memoryview((text + "\n").encode("utf-8"))
        with self.lock:
            if self.closed:
                return
            try:
                while data:
                    n = os.write(1, data)
                    data = data[n:]
            except OSError:
                # The reader went away (EPIPE). A hanging process keeps hanging.
                self.closed = True
                if not self.hanging:
                    os._exit(0)

    def emit(self, obj):
        self.line(json.dumps(obj))

    def close(self):
        with self.lock:
            self.closed = True
            try:
                os.close(1)
            except OSError:
                pass


OUT = _Out()


def err(text):
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def die(text, code=1):
    err(text)
    os._exit(code)


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def parse_mode_list(text):
    """'a:1, b' -> [("a", ["1"]), ("b", [])]."""
    modes = []
    for item in re.split(r"[,\s]+", text or ""):
        item = item.strip()
        if item:
            name, *args = item.split(":")
            modes.append((name, args))
    return modes


def load_modes():
    modes = parse_mode_list(os.environ.get("FAKE_CLAUDE_MODE", ""))
    mode_file = os.environ.get("FAKE_CLAUDE_MODE_FILE")
    if mode_file:
        try:
            modes += parse_mode_list(Path(mode_file).read_text())
        except OSError:
            pass
    return modes


def parse_args(argv):
    values, flags = {}, set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            values[OPTIONAL_VALUE_FLAGS.get(name, name)] = value
        elif arg in VALUE_FLAGS:
            if i + 1 < len(argv):
                values[arg] = argv[i + 1]
                i += 1
            else:
                values[arg] = ""
        elif arg in OPTIONAL_VALUE_FLAGS:
            name = OPTIONAL_VALUE_FLAGS[arg]
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values[name] = argv[i + 1]
                i += 1
            else:
                values[name] = ""
        elif arg.startswith("-"):
            flags.add(arg)
        i += 1
    return values, flags


def is_uuid(text):
    try:
        uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def project_slug(path):
    """The directory name the real CLI gives a working directory under projects/."""
    return re.sub(r"[^A-Za-z0-9]", "-", str(path))


class Transcripts:
    """Conversations on disk; with persist off (--no-session-persistence), in memory only."""

    def __init__(self, directory, persist=True):
        self.dir = directory
        self.persist = persist
        self.in_memory = {}

    def path(self, session_id):
        return self.dir / f"{session_id}.jsonl"

    def exists(self, session_id):
        # A session id that is not a plain uuid can never name a transcript.
        return is_uuid(session_id) and self.path(session_id).is_file()

    def append(self, session_id, entry):
        if not self.persist:
            self.in_memory.setdefault(session_id, []).append(entry)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(session_id), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()

    def entries(self, session_id):
        if not self.persist:
            return list(self.in_memory.get(session_id, []))
        try:
            lines = self.path(session_id).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def latest(self):
        try:
            files = [p for p in self.dir.glob("*.jsonl") if is_uuid(p.stem)]
        except OSError:
            return None
        if not files:
            return None
        return max(files, key=lambda p: p.stat().st_mtime).stem


def resolve_session(values, flags, transcripts):
    """Pick the session id, as strictly as the real CLI does."""
    session_arg = values.get("--session-id")
    resume = values.get("--resume")
    fork = "--fork-session" in flags
    if session_arg is not None and not is_uuid(session_arg):
        die("Error: Invalid session ID. Must be a valid UUID.")
    if "--continue" in flags or "-c" in flags:
        resume = transcripts.latest()
        if resume is None:
            die("No conversation found to continue")
    if resume is not None:
        if not transcripts.exists(resume):
            die(f"No conversation found with session ID: {resume}")
        if session_arg is not None and not fork:
            die(
                "Error: --session-id can only be used with --continue or --resume "
                "if --fork-session is also specified."
            )
        if not fork:
            return resume
        new_id = session_arg or str(uuid.uuid4())
        if transcripts.exists(new_id):
            die(f"Error: Session ID {new_id} is already in use.")
        transcripts.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(transcripts.path(resume), transcripts.path(new_id))
        return new_id
    if session_arg is not None:
        if transcripts.exists(session_arg):
            die(f"Error: Session ID {session_arg} is already in use.")
        return session_arg
    return str(uuid.uuid4())


def append_log(record):
    path = os.environ.get("FAKE_CLAUDE_LOG")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass


def _text_blocks(message):
    content = (message.get("message") or {}).get("content", "")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        ]
    return [str(content)]


def prompt_text(message):
    """The prompt: the text blocks that are not context (<system-reminder> blocks)."""
    blocks = _text_blocks(message)
    if len(blocks) == 1:
        return blocks[0]
    return "".join(b for b in blocks if not b.startswith(REMINDER_PREFIX))


def image_blocks(message):
    """[(media_type, decoded bytes)] of the image blocks a user message brings."""
    content = (message.get("message") or {}).get("content", "")
    found = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "image":
                source = block.get("source") or {}
                try:
                    size = len(base64.b64decode(source.get("data", ""), validate=True))
                except ValueError:
                    size = -1
                found.append((source.get("media_type"), size))
    return found


def context_blocks(message):
    """The <system-reminder> blocks a user message of several blocks brings along."""
    blocks = _text_blocks(message)
    if len(blocks) == 1:
        return []
    return [b for b in blocks if b.startswith(REMINDER_PREFIX)]


def load_memory_files(values):
    """The CLAUDE.md files the real CLI loads at start: [(source, text)], each file once."""
    sources = values.get("--setting-sources")
    enabled = {"user", "project", "local"}
    if sources is not None:
        enabled = {part.strip() for part in sources.split(",") if part.strip()}
    candidates = []
    if "user" in enabled:
        config = Path(os.environ.get("CLAUDE_CONFIG_DIR") or (Path.home() / ".claude"))
        candidates.append(("user", config / "CLAUDE.md"))
    cwd = Path(os.getcwd())
    for directory in reversed([cwd, *cwd.parents]):  # the outermost first
        if "project" in enabled:
            candidates.append(("project", directory / "CLAUDE.md"))
            candidates.append(("project", directory / ".claude" / "CLAUDE.md"))
        if "local" in enabled:
            candidates.append(("local", directory / "CLAUDE.local.md"))
    found, seen = [], set()
    for source, path in candidates:
        try:
            key = path.resolve()
            if key in seen or not path.is_file():
                continue
            seen.add(key)
            found.append((source, path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return found


def parse_directives(prompt):
    found = {}
    for body in DIRECTIVE_RE.findall(prompt):
        name, *args = body.split(":")
        found[name.strip()] = [a.strip() for a in args]
    return found


def num(args, index, default, kind=float):
    try:
        return kind(args[index])
    except (IndexError, ValueError):
        return default


class Session:
    def __init__(self, session_id, transcripts, values, turn_defaults):
        self.session_id = session_id
        self.transcripts = transcripts
        self.values = values
        self.turn_defaults = turn_defaults
        self.cond = threading.Condition()
        self.received = 0  # user messages read so far
        self.interrupted_upto = 0  # every turn numbered <= this is interrupted
        self.turns = queue.Queue()
        # Read once, at start, as the real CLI does; then context the messages brought.
        self.memory_files = load_memory_files(values)
        self.contexts = []
        # As started; control requests change them (from the reader thread).
        self.model = values.get("--model") or MODEL
        # The conversation's running cost: restored from its transcript, as the real CLI does.
        self.cost_usd = sum(
            entry.get("costUSD", 0.0)
            for entry in transcripts.entries(session_id)
            if entry.get("type") == "cost"
        )
        self.permission_mode = values.get("--permission-mode") or "default"

    def whoami(self):
        def listed(flag):
            value = self.values.get(flag)
            return None if value is None else [t for t in value.split(",") if t]

        budget = self.values.get("--max-budget-usd")
        turns = self.values.get("--max-turns")
        return {
            "model": self.model,
            "permissionMode": self.permission_mode,
            "appendSystemPrompt": self.values.get("--append-system-prompt"),
            "allowedTools": listed("--allowedTools"),
            "disallowedTools": listed("--disallowedTools"),
            "maxTurns": None if turns is None else int(turns),
            "maxBudgetUsd": None if budget is None else float(budget),
            "pid": os.getpid(),
        }

    def memory(self):
        return [f"{source}: {text.strip()}" for source, text in self.memory_files] + [
            f"context: {text}" for text in self.contexts
        ]

    # -- called from the reader thread ------------------------------------
    def user_arrived(self, message):
        with self.cond:
            self.received += 1
            self.turns.put((self.received, message))

    def interrupt(self):
        with self.cond:
            self.interrupted_upto = self.received
            self.cond.notify_all()

    # -- main thread --------------------------------------------------------
    def is_interrupted(self, number):
        with self.cond:
            return self.interrupted_upto >= number

    def wait_interrupt(self, number, seconds):
        """Sleep up to `seconds`; True as soon as turn `number` is interrupted."""
        with self.cond:
            return self.cond.wait_for(lambda: self.interrupted_upto >= number, seconds)

    def run_turn(self, number, message):
        prompt = prompt_text(message)
        self.contexts.extend(context_blocks(message))
        if prompt.strip() == "/clear":
            # A local command: the conversation moves to a new, empty session, without
            # the context blocks earlier messages brought.
            self.session_id = str(uuid.uuid4())
            self.contexts = []
            self.cost_usd = 0.0
        Turn(self, number, prompt, image_blocks(message)).run()


class Turn:
    def __init__(self, session, number, prompt, images=()):
        self.s = session
        self.number = number
        self.prompt = prompt
        self.images = list(images)
        self.texts = []
        self.started = time.monotonic()
        self.sid = session.session_id
        self.total_only = False

    def base(self, kind):
        return {"type": kind, "session_id": self.sid, "uuid": str(uuid.uuid4())}

    def assistant(self, content):
        msg = {
            **self.base("assistant"),
            "message": {
                "id": "msg_" + uuid.uuid4().hex[:24],
                "type": "message",
                "role": "assistant",
                "model": self.s.model,
                "content": content,
                "stop_reason": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
            "parent_tool_use_id": None,
        }
        self.s.transcripts.append(
            self.sid,
            {
                "type": "assistant",
                "sessionId": self.sid,
                "uuid": msg["uuid"],
                "timestamp": now_iso(),
                "message": msg["message"],
            },
        )
        OUT.emit(msg)

    def say(self, text):
        self.texts.append(text)
        self.assistant([{"type": "text", "text": text}])

    def result(self, subtype="success", is_error=False, **extra):
        elapsed = max(1, int((time.monotonic() - self.started) * 1000))
        own = 0.0 if self.prompt.strip() == "/clear" else TURN_COST_USD
        if own:
            self.s.cost_usd += own
            self.s.transcripts.append(self.sid, {"type": "cost", "costUSD": own})
        msg = {
            **self.base("result"),
            "subtype": subtype,
            "duration_ms": elapsed,
            "duration_api_ms": elapsed,
            "is_error": is_error,
            "num_turns": 1,
            "stop_reason": "end_turn" if not is_error else None,
            "total_cost_usd": self.s.cost_usd,
            "usage": {
                "input_tokens": max(1, len(self.prompt) // 4),
                "output_tokens": max(1, sum(len(t) for t in self.texts) // 4),
            },
            "modelUsage": {self.s.model: {"costUSD": self.s.cost_usd}} if self.s.cost_usd else {},
            "model_usage_since_last_result": {self.s.model: {"costUSD": own}} if own else {},
        }
        if self.total_only:
            del msg["model_usage_since_last_result"]
        msg.update(extra)
        OUT.emit(msg)

    def run_tool(self, tool_input, command):
        """A Bash tool call, really run with /bin/sh; returns its output."""
        tool_id = "toolu_" + uuid.uuid4().hex[:12]
        self.assistant([{"type": "tool_use", "id": tool_id, "name": "Bash", "input": tool_input}])
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            output, failed = done.stdout + done.stderr, done.returncode != 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            output, failed = str(exc), True
        OUT.emit(
            {
                **self.base("user"),
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": tool_id,
                            "content": output,
                            "is_error": failed,
                        }
                    ],
                },
                "parent_tool_use_id": None,
            }
        )
        return output

    def retry_then_fail(self, args):
        status = num(args, 0, 500, int) or None
        count = num(args, 1, 10, int)
        delay = num(args, 2, 0.5)
        attempt = 0
        while count == 0 or attempt < count:
            attempt += 1
            OUT.emit(
                {
                    **self.base("system"),
                    "subtype": "api_retry",
                    "attempt": attempt,
                    "max_retries": count or 10,
                    "retry_delay_ms": int(delay * 1000),
                    "error_status": status,
                    "error": "unknown" if status is None else "fake upstream error",
                }
            )
            if self.s.wait_interrupt(self.number, delay):
                return self.interrupted_result()
        text = f"API Error: {status or 'Connection error'} fake upstream error"
        self.say(text)
        return self.result(result=text, is_error=True, api_error_status=status)

    def interrupted_result(self):
        self.result("error_during_execution", True, errors=["[Request interrupted by user]"])

    def hang_forever(self, hard):
        if hard:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        OUT.hanging = True
        self.say("partial before hang")
        while True:
            time.sleep(3600)

    def echo_reply(self):
        match = NAME_RE.search(self.prompt)
        if match:
            return f"Nice to meet you, {match.group(1).strip()}."
        if "What is my name?" in self.prompt:
            name = None
            for entry in self.s.transcripts.entries(self.sid):
                content = (entry.get("message") or {}).get("content")
                if entry.get("type") == "user" and isinstance(content, str):
                    found = NAME_RE.findall(content)
                    if found:
                        name = found[-1].strip()
            return f"Your name is {name}." if name else "I don't know your name."
        return f"echo: {self.prompt}"

    def run(self):
        s = self.s
        append_log(
            {
                "pid": os.getpid(),
                "event": "turn",
                "at": time.time(),
                "prompt": self.prompt,
                "session_id": self.sid,
                "memory": s.memory(),
                "images": self.images,
            }
        )
        # The prompt reaches the transcript before any of the reply is streamed.
        s.transcripts.append(
            self.sid,
            {
                "type": "user",
                "sessionId": self.sid,
                "uuid": str(uuid.uuid4()),
                "timestamp": now_iso(),
                "message": {"role": "user", "content": self.prompt},
            },
        )
        OUT.emit(
            {
                **self.base("system"),
                "subtype": "init",
                "cwd": os.getcwd(),
                "tools": ["Bash", "Read", "Write"],
                "mcp_servers": [],
                "model": s.model,
                "permissionMode": s.permission_mode,
                "apiKeySource": "none",
                "claude_code_version": CLI_VERSION,
                "output_style": "default",
            }
        )
        d = dict(s.turn_defaults)
        d.update(parse_directives(self.prompt))
        self.total_only = "total_only" in d
        if self.prompt.strip() == "/clear":
            return self.result(result="")

        if self.s.is_interrupted(self.number):
            return self.interrupted_result()
        if "stderr" in d:
            for i in range(num(d["stderr"], 0, 10, int)):
                err(f"fake_claude noise line {i + 1}: lorem ipsum dolor sit amet")
        if "sleep" in d:
            if s.wait_interrupt(self.number, num(d["sleep"], 0, 1.0)):
                return self.interrupted_result()
        if "garbage" in d:
            OUT.line("{this is not json")
        if "truncated" in d:
            OUT.line('{"type":"assistant","message":{"model":"fake","content":[{"type":"te')
            err("fake_claude: output truncated")
            os._exit(1)
        if "crash" in d:
            self.say("partial before crash")
            err("fake_claude: simulated crash")
            os._exit(num(d["crash"], 0, 3, int))
        if "hang" in d or "hang_hard" in d:
            self.hang_forever(hard="hang_hard" in d)
        if "close_stdout" in d:
            self.say("partial before close")
            OUT.close()
            time.sleep(0.5)
            os._exit(0)
        if "error" in d:
            return self.result(
                "error_max_turns",
                True,
                errors=["Reached maximum number of turns (1)"],
                terminal_reason="max_turns",
            )
        if "slow" in d or "stamp" in d:
            stamp = "stamp" in d
            args = d["stamp"] if stamp else d["slow"]
            count = num(args, 0, 5, int)
            delay = num(args, 1, 0.5)
            for i in range(1, count + 1):
                if i > 1 and s.wait_interrupt(self.number, delay):
                    return self.interrupted_result()
                if s.is_interrupted(self.number):
                    return self.interrupted_result()
                self.say(f"stamp {time.monotonic():.6f}" if stamp else f"piece {i}")
            return self.result(result="".join(self.texts))
        if "big" in d:
            remaining = num(d["big"], 0, 100_000, int)
            chunk = 65_536
            while remaining > 0:
                self.say("x" * min(chunk, remaining))
                remaining -= chunk
            return self.result(result="".join(self.texts))
        if "retry" in d:
            return self.retry_then_fail(d["retry"])
        if "memory" in d:
            self.say("memory: " + (" | ".join(s.memory()) or "none"))
            return self.result(result="".join(self.texts))
        if "whoami" in d:
            self.say("whoami: " + json.dumps(s.whoami()))
            return self.result(result="".join(self.texts))
        if "images" in d:
            shown = ", ".join(f"{kind} {size}" for kind, size in self.images)
            self.say("images: " + (shown or "none"))
            return self.result(result="".join(self.texts))
        if "bash" in d:
            command = DIRECTIVE_RE.sub("", self.prompt).strip()
            output = self.run_tool({"command": command}, command)
            self.say(output)
            return self.result(result=output)
        if "tool" in d:
            tool_use = {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "Bash",
                "input": {"command": "ls"},
            }
            self.assistant([tool_use])
            OUT.emit(
                {
                    **self.base("user"),
                    "message": {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": "README.md\n",
                                "is_error": False,
                            }
                        ],
                    },
                    "parent_tool_use_id": None,
                }
            )
        self.say(self.echo_reply())
        self.result(result="".join(self.texts))


def reader(session, no_init):
    """Read stdin NDJSON; answer control requests here so interrupts land mid-turn."""
    pending = bytearray()
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        if b"\n" not in chunk:  # (a long line, an image: no quadratic re-splitting)
            continue
        *lines, rest = pending.split(b"\n")
        pending = bytearray(rest)
        for raw in lines:
            handle_line(session, bytes(raw), no_init)
    if pending.strip():
        handle_line(session, bytes(pending), no_init)
    session.turns.put(_EOF)


def handle_line(session, raw, no_init):
    raw = raw.strip()
    if not raw:
        return
    try:
        msg = json.loads(raw)
    except ValueError:
        err(f"fake_claude: ignoring malformed input line: {raw[:200]!r}")
        return
    if not isinstance(msg, dict):
        return
    kind = msg.get("type")
    if kind == "control_request":
        request = msg.get("request") or {}
        subtype = request.get("subtype")
        if subtype == "initialize" and no_init:
            return
        if subtype == "interrupt":
            session.interrupt()
        elif subtype == "set_model":
            session.model = request.get("model") or MODEL
        elif subtype == "set_permission_mode":
            session.permission_mode = request.get("mode") or "default"
        response = {}
        if subtype == "initialize":
            response = {
                "commands": [],
                "output_style": "default",
                "available_output_styles": ["default"],
                "models": [],
                "account": {},
            }
        OUT.emit(
            {
                "type": "control_response",
                "response": {
                    "subtype": "success",
                    "request_id": msg.get("request_id"),
                    "response": response,
                },
            }
        )
    elif kind == "user":
        session.user_arrived(msg)
    # control_response, keep_alive and anything else: nothing to do.


def refuse_root_if_asked(values, flags):
    bypass = (
        values.get("--permission-mode") == "bypassPermissions"
        or "--dangerously-skip-permissions" in flags
    )
    if (
        os.environ.get("FAKE_CLAUDE_REFUSE_ROOT") == "1"
        and bypass
        and os.geteuid() == 0
        and os.environ.get("IS_SANDBOX") != "1"
    ):
        die(
            "--dangerously-skip-permissions cannot be used with root/sudo privileges"
            " for security reasons"
        )


def main(argv):
    if argv == ["--version"]:  # (the service's start-up probe: nothing recorded)
        print(f"{CLI_VERSION} (Claude Code)")
        return
    pid = os.getpid()
    piddir = os.environ.get("FAKE_CLAUDE_PIDDIR")
    if piddir:
        try:
            Path(piddir).mkdir(parents=True, exist_ok=True)
            (Path(piddir) / str(pid)).touch()
        except OSError:
            pass
    append_log(
        {
            "pid": pid,
            "event": "start",
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "has_anthropic_api_key": bool(os.environ.get("ANTHROPIC_API_KEY")),
            # (An agent's own token from the model proxy starts "ccapi-agent-".)
            "anthropic_api_key_head": os.environ.get("ANTHROPIC_API_KEY", "")[:12],
            "anthropic_base_url": os.environ.get("ANTHROPIC_BASE_URL", ""),
            "entrypoint": os.environ.get("CLAUDE_CODE_ENTRYPOINT"),
        }
    )

    modes = load_modes()
    startup = {name: args for name, args in modes if name in STARTUP_MODES}
    turn_defaults = {name: args for name, args in modes if name in TURN_DIRECTIVES}

    if "exit_at_start" in startup:
        code = num(startup["exit_at_start"], 0, 1, int)
        die(f"fake_claude: exit_at_start (exit code {code})", code)

    values, flags = parse_args(argv)
    refuse_root_if_asked(values, flags)
    persist = "--no-session-persistence" not in flags
    if os.environ.get("FAKE_CLAUDE_HOME"):
        transcripts = Transcripts(Path(os.environ["FAKE_CLAUDE_HOME"]) / "transcripts", persist)
    else:
        config = Path(os.environ.get("CLAUDE_CONFIG_DIR") or (Path.home() / ".claude"))
        transcripts = Transcripts(config / "projects" / project_slug(os.getcwd()), persist)
    session_id = resolve_session(values, flags, transcripts)
    session = Session(session_id, transcripts, values, turn_defaults)

    if "garbage_at_start" in startup:
        OUT.line("{garbage")
    if "slow_start" in startup:
        time.sleep(num(startup["slow_start"], 0, 1.0))

    thread = threading.Thread(target=reader, args=(session, "no_init" in startup), daemon=True)
    thread.start()
    while True:
        item = session.turns.get()
        if item is _EOF:
            break
        session.run_turn(*item)
    # os._exit: never wait on the daemon reader thread or buffered stdio locks.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
