"""The dispatcher's waiting line of jobs.

FIFO today. It is its own class so that per-user fair queueing (round-robin
between users) can replace it without touching dispatch: the dispatcher only
pushes, pops the next job, removes a withdrawn one and expires overdue ones.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from ..messages import Job


class JobQueue:
    """Jobs waiting for an agent, bounded by ``max_size``; owned by the dispatcher."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def full(self) -> bool:
        return len(self._jobs) >= self.max_size

    def push(self, job: Job) -> None:
        self._jobs[job.id] = job

    def push_front(self, job: Job) -> None:
        """Put back a job that could not be handed over, ahead of the rest."""
        self._jobs[job.id] = job
        self._jobs.move_to_end(job.id, last=False)

    def pop_next(self) -> Job | None:
        if not self._jobs:
            return None
        return self._jobs.popitem(last=False)[1]

    def remove(self, job_id: str) -> Job | None:
        return self._jobs.pop(job_id, None)

    def pop_expired(self, now: float) -> list[Job]:
        expired = [job for job in self._jobs.values() if job.deadline <= now]
        for job in expired:
            del self._jobs[job.id]
        return expired

    def pop_all(self) -> list[Job]:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        return jobs

    def next_deadline(self) -> float:
        return min((job.deadline for job in self._jobs.values()), default=math.inf)
