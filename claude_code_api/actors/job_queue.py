"""The dispatcher's waiting line of jobs: fair between users.

Jobs wait in a :class:`~claude_code_api.actors.fair_line.FairLine` keyed by
their user: round-robin between users' lines, FIFO within one, so a user with
a backlog does not delay another user's job behind it. The dispatcher only
pushes, pops the next job, removes a withdrawn one and expires overdue ones.
A session's own turns wait in a ``JobQueue`` too (one user: plain FIFO).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..messages import Job
from .fair_line import FairLine


class JobQueue:
    """Jobs waiting for an agent; owned by the dispatcher.

    ``max_size`` bounds all jobs together, ``max_per_user`` (default: ``max_size``)
    the jobs of one user. The queue does not refuse anything itself: the
    dispatcher asks :attr:`full` / :meth:`full_for` and answers 429.
    """

    def __init__(self, max_size: int, max_per_user: int | None = None) -> None:
        self.max_size = max_size
        self.max_per_user = max_size if max_per_user is None else max_per_user
        self._jobs: FairLine[str, Job] = FairLine()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def full(self) -> bool:
        return len(self._jobs) >= self.max_size

    def full_for(self, user_id: str) -> bool:
        """``user_id`` has ``max_per_user`` jobs waiting already."""
        return self._jobs.count(user_id) >= self.max_per_user

    def push(self, job: Job) -> None:
        self._jobs.push(job.user_id, job.id, job)

    def push_front(self, job: Job) -> None:
        """Put back a job that could not be handed over: next in line, as it was."""
        self._jobs.push_front(job.user_id, job.id, job)

    def pop_next(self, may_serve: Callable[[str], bool] | None = None) -> Job | None:
        """The next job in fair order of the users ``may_serve`` accepts (default: all)."""
        return self._jobs.pop_next(may_serve)

    def peek_next(self) -> Job | None:
        return self._jobs.peek_next()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def ahead_of(self, job_id: str) -> int:
        """Jobs that will start before ``job_id``'s if no other arrives (it is queued)."""
        return self._jobs.ahead_of(job_id)

    def jobs(self) -> list[Job]:
        """Every job waiting (not in serving order)."""
        return list(self._jobs.values())

    def remove(self, job_id: str) -> Job | None:
        return self._jobs.remove(job_id)

    def pop_expired(self, now: float) -> list[Job]:
        if not self._jobs:  # the usual case, asked on every dispatcher message
            return []
        expired = [job for job in self._jobs.values() if job.deadline <= now]
        for job in expired:
            self._jobs.remove(job.id)
        return expired

    def pop_all(self) -> list[Job]:
        jobs = list(self._jobs.values())
        for job in jobs:
            self._jobs.remove(job.id)
        return jobs

    def next_deadline(self) -> float:
        if not self._jobs:
            return math.inf
        return min(job.deadline for job in self._jobs.values())
