"""The running service against its own OpenAPI document: a bounded schemathesis pass.

The real service (real SDK, the fake CLI) is started by the tests' launcher, and
schemathesis's command line fuzzes every operation ``/openapi.json`` lists, with
valid and invalid data, checking every answer: no 5xx, every status, header,
content type and body as documented, invalid data refused and valid data
accepted, and every authenticated route refusing missing or wrong credentials.

Authorised paths are exercised too: schemathesis holds an API key (user "api")
and a bearer token signed with ``NEXTAUTH_SECRET`` (user "web:alice"), both in
``AUTH_ADMINS``, so ``/auth/login`` and ``/auth/exchange`` answer past their
403. Where a check's defaults do not fit this API, ``tests/schemathesis.toml``
says so and why.

Bounded: :data:`MAX_EXAMPLES` cases per operation, one request at a time (about a
minute on a 2-CPU machine). The seed is random and printed; set
``SCHEMATHESIS_SEED`` to replay one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from claude_code_api.http.auth import make_token
from claude_code_api.http.openapi import OPERATION_IDS
from tests.support.harness import API_KEY, run_service, wait_healthy

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent.parent.joinpath("schemathesis.toml")
MAX_EXAMPLES = 60
SECRET = "schemathesis-nextauth-secret"


def schemathesis_command(url: str, workdir: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
        # Where it keeps failures to replay: not the repository.
        "--report-dir",
        str(workdir / "report"),
    ]
    seed = os.environ.get("SCHEMATHESIS_SEED")
    if seed:
        command += ["--seed", seed]
    return command


async def run_schemathesis(url: str, workdir: Path) -> subprocess.CompletedProcess[bytes]:
    token = make_token(SECRET, "alice", round(time.time() * 1000))
    env = {
        **os.environ,
        # Read by tests/schemathesis.toml ([auth.openapi.*]).
        "CCA_FUZZ_API_KEY": API_KEY,
        "CCA_FUZZ_TOKEN": token,
    }
    return await trio.run_process(
        schemathesis_command(url, workdir),
        env=env,
        cwd=str(workdir),
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
    )


async def test_every_answer_of_the_live_service_conforms_to_its_openapi_document(tmp_path):
    env = {
        "POOL_SIZE": "2",
        "NEXTAUTH_SECRET": SECRET,
        "TOKEN_USER_PREFIX": "web:",
        "AUTH_ADMINS": "api,web:alice",
        # Bounds the fuzzer reaches quickly, so their refusals are exercised too.
        "MAX_TIMEOUT_MS": "30000",
        "DEFAULT_TIMEOUT_MS": "30000",
    }
    with trio.fail_after(300):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=2)
            workdir = tmp_path / "schemathesis"
            workdir.mkdir()
            began = time.monotonic()
            done = await run_schemathesis(service.url, workdir)
            took = time.monotonic() - began
    output = done.stdout.decode(errors="replace")
    print(output[-6000:])
    print(f"schemathesis took {took:.0f} s")
    assert done.returncode == 0, output[-20000:]
    # It tested something: every operation but the document itself, many cases of each.
    tested = re.search(r"Tested: (\d+)", output)
    generated = re.search(r"(\d+) generated", output)
    assert tested and generated, output[-3000:]
    assert int(tested[1]) >= len(OPERATION_IDS) - 1
    assert int(generated[1]) >= 10 * len(OPERATION_IDS)
    assert "Traceback" not in service.log_text(), service.log_text()[-5000:]
