"""DATABASE_URL: how it is read, and that without it nothing loads PostgreSQL's driver.
(No server needed.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from claude_code_api.config.settings import ConfigError, load_settings

PASSWORD = "s3cret-pw"


def test_unset_by_default() -> None:
    assert load_settings({}).database_url is None


@pytest.mark.parametrize(
    "url", ["postgresql://app@db.internal:5432/service", "postgres://app@[::1]/service"]
)
def test_a_postgresql_url_is_taken_as_written(url: str) -> None:
    assert load_settings({"DATABASE_URL": f" {url} "}).database_url == url


@pytest.mark.parametrize(
    "url", [f"mysql://app:{PASSWORD}@db/service", f"app:{PASSWORD}@db", f"postgresql://[{PASSWORD}"]
)
def test_anything_else_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"DATABASE_URL": url})
    assert str(refused.value) == "DATABASE_URL: expected a postgresql:// URL"


def test_the_password_stays_out_of_repr() -> None:
    settings = load_settings({"DATABASE_URL": f"postgresql://app:{PASSWORD}@db/service"})
    assert PASSWORD not in repr(settings)


def test_without_it_the_service_never_imports_psycopg() -> None:
    probe = (
        "import sys, claude_code_api.__main__, claude_code_api.supervisor;"
        " print(sorted(name for name in sys.modules if name.startswith('psycopg')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
