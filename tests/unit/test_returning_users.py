"""Which users' one-shot agents are kept: those who came back within AGENT_REUSE_S."""

from __future__ import annotations

from claude_code_api.actors.returning_users import ReturningUsers


def test_a_user_is_returning_from_their_second_one_shot_within_the_window():
    users = ReturningUsers(window_s=5.0)
    assert not users.came_back("alice", 100.0)  # her first
    assert users.came_back("alice", 104.0)
    assert users.came_back("alice", 109.0)  # (5 s after the one before: still within)
    assert not users.came_back("alice", 115.0)  # away for longer: a first again
    assert not users.came_back("bob", 115.5)  # another user's visits are not hers


def test_users_out_of_the_window_are_forgotten():
    users = ReturningUsers(window_s=5.0)
    for n in range(1000):
        users.came_back(f"user-{n}", float(n))
    assert list(users.last_seen) == [f"user-{n}" for n in range(994, 1000)]
