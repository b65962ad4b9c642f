"""Who came back: the users whose one-shot agents are worth keeping (``AGENT_REUSE_S``).

A one-shot's agent kept for its user's next request saves that request a turn's set-up, but
costs the machine whatever the agent does while kept: with the real CLI, its own background
work in the seconds after its start and after the reset (~0.4 s of CPU in all on a 2-CPU
machine), on top of the agent that warms in its place. For a user who never comes back that is
pure loss; with many users, each sending one request, it made every request cost ~30 % more
CPU. So an agent is kept only for a user whose previous one-shot came within the window
(``AGENT_REUSE_S``): from their second request on, a user who sends several keeps their agent.

Owned by the dispatcher (one instance, in its task); nothing here blocks or fails.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs


@attrs.define
class ReturningUsers:
    """The time of each user's last one-shot within the last ``window_s`` seconds."""

    window_s: float
    # user -> trio time of their last one-shot, the oldest first (forgotten once out of the
    # window: users come and go, this stays as small as the window's traffic).
    last_seen: OrderedDict[str, float] = attrs.Factory(OrderedDict)

    def came_back(self, user_id: str, at: float) -> bool:
        """Note ``user_id``'s one-shot at ``at``; whether their previous one came within the
        window before it."""
        previous = self.last_seen.pop(user_id, None)
        self.last_seen[user_id] = at
        while self.last_seen:
            oldest, seen = next(iter(self.last_seen.items()))
            if at - seen <= self.window_s:
                break
            del self.last_seen[oldest]
        return previous is not None and at - previous <= self.window_s
