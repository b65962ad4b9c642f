"""Unit tests of the fair line: round-robin between owners, FIFO within one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from claude_code_api.actors.fair_line import FairLine


def drain(line: FairLine[str, str]) -> list[str]:
    served = []
    while (item := line.pop_next()) is not None:
        served.append(item)
    return served


def filled(*items: tuple[str, str]) -> FairLine[str, str]:
    line: FairLine[str, str] = FairLine()
    for owner, key in items:
        line.push(owner, key, key)
    return line


def test_owners_take_turns_and_each_owners_items_keep_their_order():
    line = filled(*[("alice", f"a{i}") for i in range(4)], ("bob", "b0"), ("bob", "b1"))
    line.push("carol", "c0", "c0")
    assert (len(line), line.count("alice"), line.count("bob"), line.count("dave")) == (7, 4, 2, 0)
    assert drain(line) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert len(line) == 0 and line.pop_next() is None


def test_a_newcomer_waits_for_at_most_one_item_of_each_owner_already_waiting():
    line = filled(*[("alice", f"a{i}") for i in range(100)])
    assert line.pop_next() == "a0"
    line.push("bob", "b0", "b0")
    assert [line.pop_next(), line.pop_next()] == ["a1", "b0"]


def test_peek_next_shows_what_pop_next_takes_and_leaves_it():
    line = filled(("alice", "a0"), ("alice", "a1"), ("bob", "b0"))
    assert line.peek_next() == "a0" and len(line) == 3
    assert line.pop_next() == "a0"
    assert line.peek_next() == "b0"
    assert FairLine().peek_next() is None


def test_push_front_puts_an_item_back_first_in_line():
    line = filled(("alice", "a0"), ("alice", "a1"), ("bob", "b0"))
    assert line.pop_next() == "a0"
    line.push_front("alice", "a0", "a0")  # could not be handed over
    assert drain(line) == ["a0", "b0", "a1"]
    line = filled(("alice", "a0"), ("bob", "b0"))
    line.push_front("carol", "c0", "c0")  # an owner with nothing waiting yet
    assert drain(line) == ["c0", "a0", "b0"]


def test_removing_an_owners_last_item_takes_the_owner_out_of_the_rotation():
    line = filled(("alice", "a0"), ("bob", "b0"), ("bob", "b1"), ("carol", "c0"))
    assert line.remove("a0") == "a0"
    assert line.remove("a0") is None
    assert "a0" not in line and "b1" in line
    assert line.count("alice") == 0
    assert drain(line) == ["b0", "c0", "b1"]


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=60))
def test_against_a_model_fifo_per_owner_and_never_two_turns_while_another_waits(operations):
    """Random pushes and pops: each owner's items come out in order, and an owner
    is served twice only if no other owner that was waiting meanwhile was passed over."""
    line: FairLine[int, tuple[str, int]] = FairLine()
    pushed: dict[str, list[int]] = {}
    served: list[tuple[str, int]] = []
    waiting_since: dict[str, int] = {}  # owner -> pops since it last got a turn or arrived
    for number, (owner, is_push) in enumerate(operations):
        if is_push:
            line.push(owner, number, (owner, number))
            pushed.setdefault(owner, []).append(number)
            waiting_since.setdefault(owner, 0)
            continue
        item = line.pop_next()
        if item is None:
            assert len(line) == 0
            continue
        who, _ = item
        served.append(item)
        # Every other waiting owner has been passed over fewer times than there are owners.
        for other, passed in waiting_since.items():
            if other != who:
                assert passed < 3  # at most one turn of each of the 3 others
        waiting_since = {o: p + 1 for o, p in waiting_since.items() if o != who}
        if line.count(who):
            waiting_since[who] = 0
    served += drain_model(line)
    for owner, numbers in pushed.items():
        assert [n for o, n in served if o == owner] == numbers


def drain_model(line: FairLine[int, tuple[str, int]]) -> list[tuple[str, int]]:
    out = []
    while (item := line.pop_next()) is not None:
        out.append(item)
    return out


def test_an_owner_passed_over_keeps_their_place_and_is_first_when_served_again():
    """MAX_RUNNING_PER_USER: an owner who runs all they may is skipped, not sent to the back."""
    line = filled(("alice", "a0"), ("alice", "a1"), ("bob", "b0"), ("bob", "b1"), ("carol", "c0"))
    not_alice = lambda owner: owner != "alice"  # noqa: E731
    assert line.peek_next(not_alice) == "b0"
    assert [line.pop_next(not_alice), line.pop_next(not_alice)] == ["b0", "c0"]
    # Alice, passed over twice, is still first; bob (served) is behind her.
    assert drain(line) == ["a0", "b1", "a1"]
    assert filled(("alice", "a0")).pop_next(not_alice) is None
