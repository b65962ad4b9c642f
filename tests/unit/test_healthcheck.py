"""The container's HEALTHCHECK command: exit 0 only for a 200 from /health."""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest


def run_check(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "claude_code_api.observe.healthcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def health_server():
    """A server on 127.0.0.1 answering GET /health with ``statuses[0]``."""
    statuses = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(statuses[0] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], statuses
    server.shutdown()
    server.server_close()


def test_healthy_on_200(health_server):
    port, _statuses = health_server
    assert run_check(port).returncode == 0


def test_unhealthy_on_503(health_server):
    port, statuses = health_server
    statuses[0] = 503
    done = run_check(port)
    assert done.returncode == 1
    assert "answered 503" in done.stderr


def test_unhealthy_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port just released.
    done = run_check(port)
    assert done.returncode == 1
    assert "healthcheck:" in done.stderr
