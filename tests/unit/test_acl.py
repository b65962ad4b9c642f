"""acl: one user given search permission on a directory, the rest of its ACL kept."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from claude_code_api.agent import acl


def supports_acls(path) -> bool:
    try:
        acl.grant_search(path, 54321)
    except OSError:
        return False
    return True


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    if not supports_acls(tmp_path):
        pytest.skip("this filesystem keeps no ACLs")
    return path


def test_a_directory_without_an_acl_reads_as_its_mode(directory):
    assert acl.read_acl(directory) == [
        (acl.USER_OBJ, 7, acl.NO_ID),
        (acl.GROUP_OBJ, 0, acl.NO_ID),
        (acl.OTHER, 0, acl.NO_ID),
    ]
    assert not acl.user_may_search(directory, 65536)


def test_search_is_given_to_that_user_only(directory):
    acl.grant_search(directory, 65536)

    assert acl.user_may_search(directory, 65536)
    assert not acl.user_may_search(directory, 65537)
    # The owning group and others get nothing; the mask shows as the group's bits.
    assert oct(directory.stat().st_mode & 0o777) == oct(0o710)
    entries = acl.read_acl(directory)
    assert (acl.GROUP_OBJ, 0, acl.NO_ID) in entries and (acl.OTHER, 0, acl.NO_ID) in entries


def test_other_entries_stay_and_a_grant_twice_is_one_entry(directory):
    acl.grant_search(directory, 1111)
    acl.grant_search(directory, 65536)
    acl.grant_search(directory, 65536)

    users = [(perms, uid) for tag, perms, uid in acl.read_acl(directory) if tag == acl.USER]
    assert users == [(acl.SEARCH, 1111), (acl.SEARCH, 65536)]


@pytest.mark.skipif(shutil.which("getfacl") is None, reason="getfacl (acl package) not installed")
def test_getfacl_reads_what_was_written(directory):
    acl.grant_search(directory, 65536)
    shown = subprocess.run(
        ["getfacl", "-n", "-p", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    assert "user:65536:--x" in shown and "mask::--x" in shown, shown


@pytest.mark.skipif(os.geteuid() == 0, reason="root may change any directory's ACL")
def test_a_directory_not_ones_own_is_refused():
    with pytest.raises(OSError):
        acl.grant_search(Path("/usr"), 65536)  # (root's: only its owner may set its ACL)
