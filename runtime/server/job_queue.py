"""Which of a model's waiting jobs runs next, and which may share its batch.

Jobs wait in lanes, one per stream and one per client for all of its unary
calls (``Infer``, KServe ``ModelInfer``). There are two classes of lanes:

- **live**: the frames of streams and captures, which arrive at their
  source's rate and are late if they wait;
- **requests**: unary calls and KServe streams, which wait their turn.

When both classes wait, live frames go first, but requests keep at least
``REQUEST_SHARE`` of the model's time (measured, so a request of 8 rows
counts as 8): live frames that ran while requests waited earn the requests
a third of their time, every request's run spends it, and a request goes
before a waiting live frame only while the requests are owed time. A live
stream's share therefore does not depend on how many calls other clients
open, and requests are never starved (after at most three times
``MAX_REQUEST_DEBT_NS`` of live frames). When one class waits alone it has
the whole model.

Within a class, lanes share by start-time fair queueing, in rows: each lane's
next job is tagged with the virtual time at which it may start (the later of
the class's clock and the end of the lane's previous job), and the smallest
tag runs (on a tie, a lane that was idle first: the order within one round
does not change anyone's share). Lanes that always have work take turns; a
lane that has been idle, such as a 30 fps stream between frames, starts at
the clock and so runs next, after only the job already running, yet cannot
take more than its share by coming and going (a lane that empties forgets
its tag, which lets it return at most one job ahead).

A batch holds jobs of one class only, one per lane: on a CPU a batch of n
rows costs nearly n inferences, so a live frame that took a request's rows
as company would wait for them, and a stream whose next frame joined its
own batch would make this one wait for it.

Not thread-safe: the worker calls it under its lock.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgescope.runtime.server.workers import Job

# The least share of the model's time that waiting requests get while live frames wait too.
REQUEST_SHARE = 0.25
_LIVE_PER_REQUEST = (1.0 - REQUEST_SHARE) / REQUEST_SHARE
# Requests that ran while no live frame waited put them in debt, but only this far: a live
# source that starts after a quiet spell must not lock the requests out for long.
MAX_REQUEST_DEBT_NS = 100_000_000


@dataclass(slots=True)
class _Lane:
    jobs: deque[Job[Any]]
    # Virtual start time of the job at its head; ties go to lanes that were idle (``fresh``), then by arrival.
    start: float
    order: int
    fresh: bool = True


@dataclass(slots=True)
class _Class:
    lanes: dict[str, _Lane] = field(default_factory=dict)
    # Virtual time: the start tag of the job that ran last.
    clock: float = 0.0

    def put(self, job: Job[Any], order: int) -> None:
        lane = self.lanes.get(job.lane)
        if lane is None:
            self.lanes[job.lane] = _Lane(deque([job]), self.clock, order)
        else:
            lane.jobs.append(job)

    def heads(self) -> list[tuple[str, _Lane]]:
        """Lanes by the order their heads may run in."""
        return sorted(self.lanes.items(), key=lambda item: (item[1].start, not item[1].fresh, item[1].order))

    def pop(self, key: str, order: int) -> Job[Any]:
        lane = self.lanes[key]
        job = lane.jobs.popleft()
        self.clock = max(self.clock, lane.start)
        if lane.jobs:
            lane.start += rows(job)
            lane.order, lane.fresh = order, False
        else:
            del self.lanes[key]
        return job


class JobQueue:
    """Lanes of waiting jobs in two classes; see the module docstring."""

    def __init__(self) -> None:
        self._live = _Class()
        self._requests = _Class()
        self._count = 0
        self._order = itertools.count()
        # Model time owed to the requests (ns): earned while live frames ran ahead of them, spent by their runs.
        self._owed_ns = 0.0

    def __len__(self) -> int:
        return self._count

    def put(self, job: Job[Any]) -> None:
        self._class(job).put(job, next(self._order))
        self._count += 1

    def withdraw(self, job: Job[Any]) -> bool:
        """Take ``job`` out if it is still waiting; True when it was."""
        lanes = self._class(job).lanes
        lane = lanes.get(job.lane)
        if lane is None or job not in lane.jobs:
            return False
        lane.jobs.remove(job)
        self._count -= 1
        if not lane.jobs:
            del lanes[job.lane]
        return True

    def pop_head(self) -> tuple[Job[Any], int]:
        """The next job by class and fair share, and its charge for ``charge`` (the queue must not be empty).

        The charge is +1 for a live job run while requests wait, -1 for a
        request, 0 for a live job that waited alone.
        """
        requests_wait = bool(self._requests.lanes)
        live = bool(self._live.lanes) and (not requests_wait or self._owed_ns <= 0)
        chosen = self._live if live else self._requests
        key, _ = chosen.heads()[0]
        self._count -= 1
        return chosen.pop(key, next(self._order)), (1 if requests_wait else 0) if live else -1

    def charge(self, charge: int, elapsed_ns: int) -> None:
        """Account a batch's run time to the requests' share (``charge`` from ``pop_head``)."""
        if charge > 0:
            self._owed_ns += elapsed_ns / _LIVE_PER_REQUEST
        elif charge < 0:
            self._owed_ns = max(-MAX_REQUEST_DEBT_NS, self._owed_ns - elapsed_ns)

    def company_waiting(self, first: Job[Any]) -> int:
        """How many other lanes of ``first``'s class have a job at their head that could share its batch."""
        lanes = self._class(first).lanes
        return sum(1 for key, lane in lanes.items() if key != first.lane and fits(lane.jobs[0], first))

    def pop_company(self, first: Job[Any], taken: set[str], room: int) -> Job[Any] | None:
        """The head of the next lane of ``first``'s class, not in ``taken``, that fits in ``room`` rows."""
        chosen = self._class(first)
        for key, lane in chosen.heads():
            if key not in taken and fits(lane.jobs[0], first) and rows(lane.jobs[0]) <= room:
                self._count -= 1
                return chosen.pop(key, next(self._order))
        return None

    def _class(self, job: Job[Any]) -> _Class:
        return self._live if job.live else self._requests


def fits(job: Job[Any], first: Job[Any]) -> bool:
    """Whether ``job`` can share ``first``'s batch: the same input, in rows of the same shape."""
    if not job.batchable or job.frame_input != first.frame_input:
        return False
    if job.tensor is None or first.tensor is None:
        # Frames prepared on the instance thread all take the manifest's input shape.
        return job.prepare is not None and first.prepare is not None
    return job.tensor.shape[1:] == first.tensor.shape[1:] and job.tensor.dtype == first.tensor.dtype


def rows(job: Job[Any]) -> int:
    """The rows ``job`` adds to a batch."""
    return job.rows if job.tensor is None else int(job.tensor.shape[0])
