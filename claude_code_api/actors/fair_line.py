"""A waiting line that is fair between owners: round-robin between their lines, FIFO within one.

Every item belongs to an *owner* (a user id). Each owner with items waiting has
a line of their own, first in first out, and the owners take turns: the next
item comes from the owner at the head of the rotation, who then goes to its
back. An owner who arrives joins the rotation at the back. So an item waits, at
most, for one item of each other owner who has items waiting — never behind
another owner's whole backlog — and an owner with 100 items waiting gets no
more turns than an owner with one.

The dispatcher's one-shot queue (:class:`~claude_code_api.actors.job_queue.JobQueue`)
and the line of sessions waiting for a live slot (in
:mod:`~claude_code_api.actors.session_scheduler`) are both built on it. Plain data,
no I/O, no trio: it never blocks, and ``pop_next``, ``push`` and ``remove`` are
O(1) but for the owner's place in the rotation (O(owners)). An owner may be passed
over for a while (``pop_next(may_serve)``: one who runs as much as they may at once)
without losing their place.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FairLine(Generic[K, V]):
    """Items ``V`` known by a unique key ``K``, each waiting in its owner's line."""

    def __init__(self) -> None:
        self._lines: dict[str, OrderedDict[K, V]] = {}
        self._owner_of: dict[K, str] = {}
        # Owners with items waiting; the head is served next.
        self._rotation: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._owner_of)

    def __contains__(self, key: K) -> bool:
        return key in self._owner_of

    def count(self, owner: str) -> int:
        """How many items ``owner`` has waiting."""
        line = self._lines.get(owner)
        return 0 if line is None else len(line)

    def owners(self) -> Iterator[str]:
        """The owners with items waiting, in turn order."""
        return iter(self._rotation)

    def values(self) -> Iterator[V]:
        """Every item, owner by owner (not in serving order)."""
        for line in self._lines.values():
            yield from line.values()

    def get(self, key: K) -> V | None:
        """``key``'s item, left in place (None if it is not there)."""
        owner = self._owner_of.get(key)
        return None if owner is None else self._lines[owner][key]

    def ahead_of(self, key: K) -> int:
        """How many items :meth:`pop_next` returns before ``key``'s, if nothing else comes.

        Owners keep their order in the rotation, so the items are served in rounds:
        in round ``r`` each owner with more than ``r`` items, in rotation order,
        gives its ``r``-th. O(items of ``key``'s owner + owners).
        """
        owner = self._owner_of[key]
        index = list(self._lines[owner]).index(key)
        ahead = index
        before_owner = True
        for other in self._rotation:
            if other == owner:
                before_owner = False
                continue
            ahead += min(len(self._lines[other]), index + before_owner)
        return ahead

    def push(self, owner: str, key: K, value: V) -> None:
        """Queue ``value`` at the back of its owner's line (a new owner: back of the rotation)."""
        self._line(owner, at_front=False)[key] = value
        self._owner_of[key] = owner

    def push_front(self, owner: str, key: K, value: V) -> None:
        """Put ``value`` back at the front of its owner's line, and that owner first in turn.

        For an item that was taken but could not be served: it loses nothing.
        """
        line = self._line(owner, at_front=True)
        line[key] = value
        line.move_to_end(key, last=False)
        self._owner_of[key] = owner
        if self._rotation[0] != owner:
            self._rotation.remove(owner)
            self._rotation.appendleft(owner)

    def peek_next(self, may_serve: Callable[[str], bool] | None = None) -> V | None:
        """The item :meth:`pop_next` would return, left in place (None if none waits)."""
        owner = self._next_owner(may_serve)
        return None if owner is None else next(iter(self._lines[owner].values()))

    def pop_next(self, may_serve: Callable[[str], bool] | None = None) -> V | None:
        """The next item in fair order (None if none waits).

        With ``may_serve``, owners it refuses are passed over: they keep their place
        in the rotation (and so are first when they may be served again), and the
        first owner it accepts gives their oldest item and goes to the back."""
        owner = self._next_owner(may_serve)
        if owner is None:
            return None
        if self._rotation[0] == owner:
            self._rotation.popleft()
        else:
            self._rotation.remove(owner)
        line = self._lines[owner]
        key, value = line.popitem(last=False)
        del self._owner_of[key]
        if line:
            self._rotation.append(owner)
        else:
            del self._lines[owner]
        return value

    def _next_owner(self, may_serve: Callable[[str], bool] | None) -> str | None:
        for owner in self._rotation:
            if may_serve is None or may_serve(owner):
                return owner
        return None

    def remove(self, key: K) -> V | None:
        """Take ``key``'s item out of the line wherever it is (None if it is not there)."""
        owner = self._owner_of.pop(key, None)
        if owner is None:
            return None
        line = self._lines[owner]
        value = line.pop(key)
        if not line:
            del self._lines[owner]
            self._rotation.remove(owner)
        return value

    def _line(self, owner: str, *, at_front: bool) -> OrderedDict[K, V]:
        line = self._lines.get(owner)
        if line is None:
            line = self._lines[owner] = OrderedDict()
            if at_front:
                self._rotation.appendleft(owner)
            else:
                self._rotation.append(owner)
        return line
