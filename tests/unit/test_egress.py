"""The egress proxy (egress.py): its policy, the addresses it never connects to, its answers.

Collaboration tests: the proxy serves a Unix socket as in the service; names resolve
through an injected resolver (no DNS), and connections to the "public" addresses it
returns go to a local echo server through an injected connector, so the allowlist and
the address checks run as they do for real, with nothing leaving the machine.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from claude_code_api.config.settings import HostPatterns
from claude_code_api.proxy.egress import (
    EgressPolicy,
    EgressProxy,
    describe_peer,
    forbidden_address,
    open_unix_listener,
)

PUBLIC = ipaddress.ip_address("203.0.113.7")  # TEST-NET-3: stands for a host on the Internet


@pytest.mark.parametrize(
    ("patterns", "host", "allowed"),
    [
        ("", "pypi.org", False),
        ("*", "anything.example", True),
        ("*.pypi.org", "files.pypi.org", True),
        ("*.pypi.org", "a.b.pypi.org", True),
        ("*.pypi.org", "pypi.org", False),
        ("*.pypi.org", "evilpypi.org", False),
        ("*.pypi.org", "pypi.org.evil.example", False),
        ("github.com", "GitHub.com.", True),
        ("github.com", "api.github.com", False),
        ("*.pypi.org, github.com", "github.com", True),
        ("203.0.113.7", "203.0.113.7", True),
    ],
)
def test_the_policy_matches_host_patterns(patterns, host, allowed):
    policy = EgressPolicy(HostPatterns().parse(patterns))
    assert policy.allows(host) is allowed


@pytest.mark.parametrize("raw", ["http://github.com", "github.com:443", "a b", "*github.com", "*."])
def test_agent_egress_refuses_what_is_not_a_host_pattern(raw):
    with pytest.raises(ValueError, match="host pattern"):
        HostPatterns().parse(raw)


def test_agent_egress_keeps_each_pattern_once_in_lower_case():
    assert HostPatterns().parse("GitHub.com., github.com,,*.PyPI.org,::1") == (
        "github.com",
        "*.pypi.org",
        "::1",
    )


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254", "fe80::1"],
)
def test_loopback_link_local_and_unspecified_addresses_are_never_reached(address):
    assert forbidden_address(ipaddress.ip_address(address)) is not None


def test_this_hosts_own_addresses_are_never_reached():
    """The service's port listens on them too (HOST=0.0.0.0), not only on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(PUBLIC), 9))  # (UDP: nothing is sent; picks the route's source)
        except OSError:
            pytest.skip("no route out of this machine: no address of its own to try")
        own = ipaddress.ip_address(probe.getsockname()[0])
    assert forbidden_address(own) == "an address of this host"
    assert forbidden_address(PUBLIC) is None


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(b"echo:" + data)


class Upstream:
    """A local echo server that the injected connector reaches for :data:`PUBLIC`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connected: list[tuple[str, int]] = []

    async def connect(self, address, port):
        self.connected.append((str(address), port))
        if address != PUBLIC:
            raise OSError(113, "No route to host")
        return await trio.open_tcp_stream("127.0.0.1", self.port)


NAMES = {
    "allowed.test": [PUBLIC],
    "other.test": [PUBLIC],
    "sneaky.test": [ipaddress.ip_address("127.0.0.1")],
    "mixed.test": [PUBLIC, ipaddress.ip_address("169.254.169.254")],
}


async def resolve(host: str, port: int):
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if host not in NAMES:
        raise OSError(-2, "Name or service not known")
    return NAMES[host]


async def ask(socket_path: Path, request: bytes) -> tuple[bytes, trio.SocketStream]:
    """Send ``request`` to the proxy; its answer's head and the open connection."""
    stream = await trio.open_unix_socket(str(socket_path))
    await stream.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data, stream


async def read_body(stream: trio.SocketStream, head: bytes) -> bytes:
    body = head.split(b"\r\n\r\n", 1)[1]
    while chunk := await stream.receive_some(65536):
        body += chunk
    return body


@pytest.fixture
async def proxy_at(tmp_path, nursery):
    """Start a proxy with the given patterns; returns its socket and the upstream."""
    listeners: list[trio.SocketListener] = []

    async def start(patterns: str) -> tuple[Path, Upstream]:
        servers = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        upstream = Upstream(servers[0].socket.getsockname()[1])
        path = tmp_path / "run" / f"egress-{len(list(tmp_path.glob('run/*')))}.sock"
        listener = open_unix_listener(path)
        listeners.append(listener)
        proxy = EgressProxy(
            EgressPolicy(HostPatterns().parse(patterns)),
            identify=lambda pid: f"pid {pid}",
            resolver=resolve,
            connector=upstream.connect,
        )
        await nursery.start(proxy.serve, listener)
        return path, upstream

    yield start
    nursery.cancel_scope.cancel()
    for listener in listeners:
        listener.socket.close()


async def test_an_allowed_host_is_tunnelled_both_ways(proxy_at):
    with trio.fail_after(10):
        path, upstream = await proxy_at("*.test")
        head, stream = await ask(path, b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: x\r\n\r\nearly")
        async with stream:
            assert head.startswith(b"HTTP/1.1 200 "), head
            data = head.split(b"\r\n\r\n", 1)[1]
            while b"early" not in data:
                data += await stream.receive_some(65536)
            assert data == b"echo:early"
            await stream.send_all(b"more")
            assert await stream.receive_some(65536) == b"echo:more"
        assert upstream.connected == [(str(PUBLIC), 443)]


@pytest.mark.parametrize(
    ("patterns", "request_line", "status", "reason"),
    [
        ("", "CONNECT allowed.test:443", 403, "host not allowed by AGENT_EGRESS"),
        ("allowed.test", "CONNECT other.test:443", 403, "host not allowed by AGENT_EGRESS"),
        ("*", "CONNECT sneaky.test:443", 403, "127.0.0.1 is a loopback address"),
        ("*", "CONNECT 127.0.0.1:8080", 403, "is a loopback address"),
        ("*", "CONNECT [::1]:8080", 403, "is a loopback address"),
        ("*", "CONNECT mixed.test:443", 403, "is a link-local address"),
        ("*", "CONNECT 169.254.169.254:80", 403, "is a link-local address"),
        ("*", "GET http://allowed.test/ ", 403, "plain HTTP is not forwarded"),
        ("*", "CONNECT nowhere.test:443", 502, "cannot resolve the host"),
        ("*", "CONNECT allowed.test", 400, "expected host:port"),
        ("*", "CONNECT allowed.test:99999", 400, "expected host:port"),
        ("*", "nonsense", 400, "malformed request"),
    ],
)
async def test_what_is_not_allowed_is_refused_with_a_reason(
    proxy_at, caplog, patterns, request_line, status, reason
):
    caplog.set_level(logging.WARNING, logger="claude_code_api.proxy.egress")
    with trio.fail_after(10):
        path, upstream = await proxy_at(patterns)
        request = (request_line.rstrip() + " HTTP/1.1").encode()
        if request_line == "nonsense":
            request = b"nonsense"
        head, stream = await ask(path, request + b"\r\n\r\n")
        async with stream:
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
            assert reason in (await read_body(stream, head)).decode()
    assert upstream.connected == []
    logged = [r.getMessage() for r in caplog.records]
    if status == 403:  # a refusal is logged, with the process it came from (the test's)
        assert len(logged) == 1 and reason in logged[0], logged
        assert logged[0].startswith(f"egress refused for pid {os.getpid()}: ")


async def test_a_refusal_is_logged_with_the_agent_and_the_host(proxy_at, caplog):
    caplog.set_level(logging.WARNING, logger="claude_code_api.proxy.egress")
    with trio.fail_after(10):
        path, _ = await proxy_at("")
        head, stream = await ask(path, b"CONNECT files.pypi.org:443 HTTP/1.1\r\n\r\n")
        await stream.aclose()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert [r.getMessage() for r in caplog.records] == [
        f"egress refused for pid {os.getpid()}: CONNECT files.pypi.org:443: host not allowed"
        " by AGENT_EGRESS"
    ]


async def test_the_socket_stays_when_the_proxy_restarts(tmp_path):
    """A sandbox binds the socket file itself: a restarted proxy must serve the same one."""
    path = tmp_path / "run" / "egress-proxy.sock"
    listener = open_unix_listener(path)
    inode = path.stat().st_ino
    with trio.fail_after(10):
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(EgressProxy(EgressPolicy()).serve, listener)
                head, stream = await ask(path, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
                await stream.aclose()
                assert head.startswith(b"HTTP/1.1 403 ")
                nursery.cancel_scope.cancel()
    assert path.stat().st_ino == inode and path.stat().st_mode & 0o777 == 0o666
    listener.socket.close()


def test_a_process_is_named_by_the_home_of_the_agent_it_descends_from(tmp_path):
    """The service's child (the agent's launcher) holds the HOME the service gave it."""
    child = subprocess.Popen(
        ["sh", "-c", "sleep 30 & wait"],
        env={"HOME": "/data/users/alice-1234", "PATH": "/bin:/usr/bin"},
    )
    try:
        for _ in range(100):
            grandchildren = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
            if grandchildren:
                break
            time.sleep(0.01)
        assert describe_peer(int(grandchildren[0])) == "the agent in /data/users/alice-1234"
        assert describe_peer(os.getpid()) == f"process {os.getpid()}"
        assert describe_peer(None) == "an unknown process"
    finally:
        child.kill()
        child.wait()


def test_unset_agent_egress_allows_nowhere():
    """Unset AGENT_EGRESS: no host at all (the model API is the model proxy's, bridged in)."""
    policy = EgressPolicy((), ())
    assert not policy.allows("api.anthropic.com")
    assert not policy.allows("pypi.org")


async def test_a_socket_is_made_however_long_its_path(tmp_path):
    """DATA_DIR's path may be longer than a Unix socket's address holds (108 bytes)."""
    path = tmp_path / ("d" * 120) / "run" / "egress-proxy.sock"
    listener = open_unix_listener(path)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(EgressProxy(EgressPolicy()).serve, listener)
                # (Reached by a short path: the sandbox side is refused at start-up instead.)
                directory = os.open(path.parent, os.O_RDONLY)
                try:
                    link = Path(f"/proc/self/fd/{directory}", path.name)
                    head, stream = await ask(link, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
                    await stream.aclose()
                finally:
                    os.close(directory)
                nursery.cancel_scope.cancel()
        assert head.startswith(b"HTTP/1.1 403 ")
    finally:
        listener.socket.close()
