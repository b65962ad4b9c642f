"""Where a user's files live: :func:`user_workspace`, a directory name no user id can escape."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from claude_code_api.store.user_paths import user_workspace

TIMEOUT = 10

DATA = Path("/srv/data")
USERS = DATA / "users"
SAFE_NAME = re.compile(r"[a-z0-9_][a-z0-9_-]*")
any_text = st.text(alphabet=st.characters(exclude_categories=()))  # lone surrogates too


def _check_workspace(user_id: str) -> Path:
    path = user_workspace(DATA, user_id)
    name = path.name
    assert path.parent == USERS  # strictly inside data_dir/users, one level down
    assert path == USERS / name and len(path.relative_to(USERS).parts) == 1
    assert os.path.normpath(path) == str(path)  # nothing for the OS to reinterpret
    assert SAFE_NAME.fullmatch(name), name  # so no "/", NUL, ".", "..", "", or "-x"
    assert 32 <= len(name) <= 65
    assert user_workspace(DATA, user_id) == path  # deterministic
    return path


@pytest.mark.parametrize(
    "user_id",
    ["", ".", "..", "../", "../../etc", "/etc/passwd", "a/b", "a\x00b", "-rf", "x" * 100_000,
     "Ünïcødé 用户", "\ud800", "alice", "Alice", "ALICE", "  ", "\n"],
)  # fmt: skip
async def test_user_workspace_examples(user_id, tmp_path):
    with trio.fail_after(TIMEOUT):
        _check_workspace(user_id)
        path = user_workspace(tmp_path, user_id)
        assert not path.exists() and not (tmp_path / "users").exists()  # not created


async def test_user_workspace_is_readable_and_case_sensitive():
    with trio.fail_after(TIMEOUT):
        names = {u: user_workspace(DATA, u).name for u in ["Alice", "alice", "al ice", "al_ice"]}
        assert names["Alice"].startswith("alice-") and names["alice"].startswith("alice-")
        assert names["al ice"].startswith("al_ice-")
        assert len(set(names.values())) == 4


@settings(max_examples=300, deadline=None)
@given(user_id=any_text)
@example(user_id="../" * 50)
async def test_user_workspace_stays_inside_users(user_id):
    with trio.fail_after(TIMEOUT):
        _check_workspace(user_id)


@settings(max_examples=300, deadline=None)
@given(user_ids=st.lists(any_text, unique=True, min_size=2))
@example(user_ids=["Alice", "alice", "ALICE", "al ice", "al_ice", "al/ice", "al\x00ice"])
@example(user_ids=["", ".", "..", "_", "-", "--"])
@example(user_ids=["a" * 40, "a" * 41, "a" * 32 + "b"])
@example(user_ids=["\ud83d\ude00", "\U0001f600"])  # surrogate pair vs the real character
async def test_distinct_users_get_distinct_workspaces(user_ids):
    with trio.fail_after(TIMEOUT):
        paths = [user_workspace(DATA, u) for u in user_ids]
        assert len(set(paths)) == len(user_ids)
        # Also distinct where the filesystem ignores case.
        assert len({str(p).casefold() for p in paths}) == len(user_ids)


def test_a_users_cwd_is_in_workspaces_dir_under_the_same_name_as_its_home():
    from claude_code_api.store.user_paths import user_cwd

    home = user_workspace(Path("/data"), "Alice")
    assert user_cwd(Path("/data"), None, "Alice") == home / "workspace"
    assert user_cwd(Path("/data"), Path("/shared/w"), "Alice") == Path("/shared/w") / home.name
