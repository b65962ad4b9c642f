"""The egress proxy: the only way out of a sandboxed agent's network namespace to the Internet.

A sandboxed agent has a network namespace of its own (see :mod:`.sandbox`): a loopback
interface and nothing else. Its bridge (socat, in the sandbox) forwards
``127.0.0.1:3128`` to this proxy's Unix socket, ``DATA_DIR/run/egress-proxy.sock``, and
the agent gets ``HTTPS_PROXY``/``HTTP_PROXY`` pointing there. The proxy serves HTTP
``CONNECT host:port`` (what every HTTPS client sends to a proxy; the TLS inside is the
agent's, end to end) to the hosts ``AGENT_EGRESS`` allows (:class:`EgressPolicy`), and
refuses everything else with a ``403`` and a one-line reason, logged with the agent it
came from. Plain HTTP (a request with an absolute URI) is refused the same way: forwarding
it means reading and rewriting every request of a connection, each of which may name
another host, for traffic that travels in clear anyway; package managers, ``git`` and
Claude Code's WebFetch speak HTTPS.

Whatever ``AGENT_EGRESS`` says (``*`` included), a connection never goes to an address of
this host or its loopback, to a link-local address (a cloud's metadata service hands out
the machine's credentials there), unspecified or multicast: :func:`forbidden_address`.
The host name is resolved here, and the connection made to the address checked, so a
name that resolves to one of those is refused too.

Error handling: every connection is handled on its own; whatever goes wrong in one
(a client that hangs up, a malformed request, an unreachable host) is answered or
closed and never reaches the proxy's nursery. ``400`` malformed request, ``403``
refused (by policy, plain HTTP, a forbidden address), ``502`` the host cannot be
resolved or connected to, ``503`` too many connections at once.

Resource handling: at most :data:`MAX_CONNECTIONS` connections at once (each holds two
descriptors of the service's); a request head must arrive within
:data:`HEAD_TIMEOUT_S` and fit in :data:`HEAD_MAX_BYTES`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio

log = logging.getLogger(__name__)

HEAD_MAX_BYTES = 8192
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
COPY_CHUNK = 65536

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
Connector = Callable[[IPAddress, int], Awaitable[trio.abc.HalfCloseableStream]]


@attrs.frozen
class EgressPolicy:
    """Which hosts agents may reach: ``AGENT_EGRESS``'s patterns (config.HostPatterns).

    ``*`` allows any host; ``*.example.com`` any name under ``example.com`` (not
    ``example.com`` itself); anything else one host name or address exactly. No
    pattern: nothing.
    """

    patterns: tuple[str, ...] = ()
    # Hosts allowed whatever the patterns say: the model API, where agents reach it by
    # CONNECT (not through their model bridge).
    always: tuple[str, ...] = ()

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.always:
            return True
        for pattern in self.patterns:
            if pattern == "*" or host == pattern:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False


def forbidden_address(address: IPAddress) -> str | None:
    """Why a connection never goes to ``address`` whatever the policy says; or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return forbidden_address(address.ipv4_mapped)
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if _is_local(address):
        return "an address of this host"
    return None


def _is_local(address: IPAddress) -> bool:
    """Whether ``address`` is one of this host's (a socket can be bound to it)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


async def resolve(host: str, port: int) -> list[IPAddress]:
    """``host``'s addresses (the system's resolver, in a thread)."""
    found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def connect(address: IPAddress, port: int) -> trio.abc.HalfCloseableStream:
    return await trio.open_tcp_stream(str(address), port)


class Refused(Exception):
    """A request answered with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str, *, logged: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.logged = logged


_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@attrs.define
class EgressProxy:
    """The proxy's state: its policy, how it resolves and connects, who is connected.

    ``identify``: the agent a client connection comes from, given the pid the kernel
    gives for its peer (None where it gives none), for the log. ``resolver`` and
    ``connector``: the system's by default; tests give their own.
    """

    policy: EgressPolicy
    identify: Callable[[int | None], str] = attrs.field(factory=lambda: describe_peer)
    resolver: Resolver = resolve
    connector: Connector = connect
    limit: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(MAX_CONNECTIONS))

    async def serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``listener`` until cancelled (it is not closed: it outlives a restart)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of descriptors: wait, as trio.serve_listeners does
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        raise
                    log.error("egress proxy: cannot accept a connection: %s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.handle, stream)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Answer one client connection. Never raises (but Cancelled)."""
        async with stream:
            try:
                self.limit.acquire_nowait()
            except trio.WouldBlock:
                await _answer(stream, 503, "too many connections through the egress proxy")
                return
            try:
                await self._handle(stream)
            except trio.BrokenResourceError:
                pass  # the client hung up
            except Exception:
                log.exception("egress proxy: a connection failed")
            finally:
                self.limit.release()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        head, rest = await _read_head(stream)
        if head is None:
            return
        try:
            host, port = self._target(head)
            upstream = await self._open(host, port)
        except Refused as refused:
            if refused.logged:
                log.warning(
                    "egress refused for %s: %s",
                    self.identify(_peer_pid(stream)),
                    refused.reason,
                )
            await _answer(stream, refused.status, refused.reason)
            return
        async with upstream:
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                await upstream.send_all(rest)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, stream, upstream)
                nursery.start_soon(_copy, upstream, stream)

    def _target(self, head: bytes) -> tuple[str, int]:
        """The host and port a request head asks for, if it may; else :class:`Refused`."""
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        words = line.split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise Refused(400, "malformed request", logged=False)
        method, target = words[0], words[1]
        if method != "CONNECT":
            raise Refused(
                403,
                f"{method} {target[:200]}: plain HTTP is not forwarded (only HTTPS, by CONNECT)",
            )
        host, separator, port_text = target.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise Refused(400, f"CONNECT {target[:200]}: expected host:port", logged=False)
        port = int(port_text)
        if not self.policy.allows(host):
            raise Refused(403, f"CONNECT {host}:{port}: host not allowed by AGENT_EGRESS")
        return host, port

    async def _open(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        """A connection to ``host:port``, to an address that is not forbidden; or Refused."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                addresses = await self.resolver(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise Refused(502, f"CONNECT {host}:{port}: cannot resolve the host ({exc})") from None
        if not addresses:
            raise Refused(502, f"CONNECT {host}:{port}: the host has no address")
        for address in addresses:
            why = forbidden_address(address)
            if why is not None:
                raise Refused(403, f"CONNECT {host}:{port}: {address} is {why}")
        failures = []
        for address in addresses:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    return await self.connector(address, port)
            except (OSError, trio.TooSlowError) as exc:
                failures.append(f"{address}: {getattr(exc, 'strerror', None) or 'timed out'}")
        raise Refused(502, f"CONNECT {host}:{port}: cannot connect ({'; '.join(failures)})")


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes | None, bytes]:
    """A request head (up to its blank line) and what came after it; None: none came."""
    data = b""
    with trio.move_on_after(HEAD_TIMEOUT_S):
        while b"\r\n\r\n" not in data:
            if len(data) > HEAD_MAX_BYTES:
                await _answer(stream, 400, "request head too long")
                return None, b""
            chunk = await stream.receive_some(HEAD_MAX_BYTES)
            if not chunk:
                return None, b""
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        return head, rest
    await _answer(stream, 400, "no request head in time")
    return None, b""


async def _answer(stream: trio.abc.Stream, status: int, reason: str) -> None:
    body = (reason + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    """Copy ``source`` to ``sink`` until its end, then end ``sink``'s sending side."""
    try:
        while chunk := await source.receive_some(COPY_CHUNK):
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    try:
        if isinstance(sink, trio.abc.HalfCloseableStream):
            await sink.send_eof()
        else:
            await sink.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _peer_pid(stream: trio.abc.Stream) -> int | None:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED); or None."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", data)[0]
    return pid or None


def describe_peer(pid: int | None, service_pid: int | None = None) -> str:
    """The agent process ``pid`` belongs to, for the log: its HOME, named by the service.

    The agent's processes (the bridge, forked by the agent's launcher) descend from the
    process the service started for the agent; its environment (which the agent cannot
    change) holds the HOME the service gave it: the user's sessions' directory, or a
    worker's one-shot directory. Blocking (reads /proc); "an unknown process" when the
    way up fails.
    """
    if pid is None:
        return "an unknown process"
    service_pid = os.getpid() if service_pid is None else service_pid
    current = pid
    for _ in range(64):
        parent = _parent_pid(current)
        if parent is None:
            break
        if parent == service_pid:
            home = _environment_value(current, "HOME")
            if home:
                return f"the agent in {home}"
            break
        current = parent
    return f"process {pid}"


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read().decode(errors="replace")
    except OSError:
        return None
    # (The command name, in parentheses, may hold spaces and parentheses itself.)
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def _environment_value(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            entries = file.read().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def open_unix_listener(path: Path) -> trio.SocketListener:
    """Listen on the Unix socket ``path`` (a stale socket there is replaced). Blocking.

    Mode 0666: agents reach it as their own OS user through a bind mount in their
    sandbox; outside, its directory (``DATA_DIR/run``, mode 0700) keeps everyone else out.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # (Through the directory's descriptor: a socket's path holds 107 bytes at most, and
        # DATA_DIR's may be longer. The sandboxes' side is checked at start-up.)
        raw.bind(f"/proc/self/fd/{directory}/{path.name}")
        os.chmod(path, 0o666)
        raw.listen(128)
    except BaseException:
        raw.close()
        raise
    finally:
        os.close(directory)
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))
