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

Within a class, clients share by start-time fair queueing, in rows, and
each client's lanes share that client's turns the same way: a client
opening many streams or calls shares one client's part of the model. Each
client's (and lane's) next job is tagged with the virtual time at which it
may start (the later of the clock and the end of its previous job), and the
smallest tag runs (on a tie, one that was idle first: the order within one
round does not change anyone's share). Those that always have work take
turns; one that has been idle, such as a 30 fps stream between frames,
starts at the clock and so runs next, after only the job already running,
yet cannot take more than its share by coming and going (one that empties
forgets its tag, which lets it return at most one job ahead).

A stream's first frame (``Job.opening``) waits in one lane of its client's
for the first frames of all that client's new streams, and that lane loses
ties to lanes of streams already running: a burst of new streams, each
sending a frame, counts as one lane, not one each, and a running stream's
next frame goes first when they are level. From its second frame on a
stream has its lane like any other. (A first frame also runs alone, see
``stages.job_for``: in a batch it would make a running stream's frame wait
for it.)

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

# The lane of a client's streams' first frames (stream lanes are named ``kind-N``, so never this).
FIRST_FRAMES = "first frames"
# The least share of the model's time that waiting requests get while live frames wait too.
REQUEST_SHARE = 0.25
_LIVE_PER_REQUEST = (1.0 - REQUEST_SHARE) / REQUEST_SHARE
# Requests that ran while no live frame waited put them in debt, but only this far: a live
# source that starts after a quiet spell must not lock the requests out for long.
MAX_REQUEST_DEBT_NS = 100_000_000


@dataclass(slots=True)
class _Tagged:
    # Virtual start time of the next job; ties go to what was running before (not ``opening``: a lane of
    # first frames, a client with nothing else waiting), then to what was idle (``fresh``), then by arrival.
    start: float
    order: int
    fresh: bool = True
    opening: bool = False

    def key(self) -> tuple[float, bool, bool, int]:
        return (self.start, self.opening, not self.fresh, self.order)

    def served(self, job: Job[Any], order: int) -> None:
        self.start += rows(job)
        self.order, self.fresh = order, False


@dataclass(slots=True)
class _Lane(_Tagged):
    jobs: deque[Job[Any]] = field(default_factory=deque)


@dataclass(slots=True)
class _Client(_Tagged):
    lanes: dict[str, _Lane] = field(default_factory=dict)
    # Virtual time among this client's lanes.
    clock: float = 0.0


@dataclass(slots=True)
class _Class:
    clients: dict[str, _Client] = field(default_factory=dict)
    # Virtual time among the clients: the start tag of the client whose job ran last.
    clock: float = 0.0

    def put(self, job: Job[Any], order: int) -> None:
        name, key = client_of(job.lane), lane_of(job)
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = _Client(self.clock, order, opening=job.opening)
        elif not job.opening:
            client.opening = False  # one of its streams is running
        lane = client.lanes.get(key)
        if lane is None:
            lane = client.lanes[key] = _Lane(client.clock, order, opening=job.opening)
        lane.jobs.append(job)

    def lanes(self) -> list[tuple[str, _Lane]]:
        """Every lane, clients and each client's lanes in the order their heads may run."""
        return [
            item
            for _, client in sorted(self.clients.items(), key=lambda c: c[1].key())
            for item in sorted(client.lanes.items(), key=lambda lane: lane[1].key())
        ]

    def find(self, job: Job[Any]) -> tuple[_Client, _Lane] | None:
        client = self.clients.get(client_of(job.lane))
        lane = None if client is None else client.lanes.get(lane_of(job))
        return None if client is None or lane is None else (client, lane)

    def pop(self, key: str, order: int) -> Job[Any]:
        name = client_of(key)
        client = self.clients[name]
        lane = client.lanes[key]
        job = lane.jobs.popleft()
        self.clock = max(self.clock, client.start)
        client.clock = max(client.clock, lane.start)
        if lane.jobs:
            lane.served(job, order)
        else:
            del client.lanes[key]
        if client.lanes:
            client.served(job, order)
        else:
            del self.clients[name]
        return job

    def forget_if_empty(self, key: str) -> None:
        name = client_of(key)
        client = self.clients[name]
        if not client.lanes[key].jobs:
            del client.lanes[key]
        if not client.lanes:
            del self.clients[name]


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
        chosen = self._class(job)
        found = chosen.find(job)
        if found is None or job not in found[1].jobs:
            return False
        found[1].jobs.remove(job)
        self._count -= 1
        chosen.forget_if_empty(lane_of(job))
        return True

    def pop_head(self) -> tuple[Job[Any], int]:
        """The next job by class and fair share, and its charge for ``charge`` (the queue must not be empty).

        The charge is +1 for a live job run while requests wait, -1 for a
        request, 0 for a live job that waited alone.
        """
        requests_wait = bool(self._requests.clients)
        live = bool(self._live.clients) and (not requests_wait or self._owed_ns <= 0)
        chosen = self._live if live else self._requests
        key, _ = chosen.lanes()[0]
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
        clients = self._class(first).clients.values()
        lanes = [(key, lane) for client in clients for key, lane in client.lanes.items()]
        # Only counted, so in no particular order (``lanes()`` sorts).
        return sum(1 for key, lane in lanes if key != lane_of(first) and fits(lane.jobs[0], first))

    def pop_company(self, first: Job[Any], taken: set[str], room: int) -> Job[Any] | None:
        """The head of the next lane of ``first``'s class, not in ``taken``, that fits in ``room`` rows."""
        chosen = self._class(first)
        for key, lane in chosen.lanes():
            if key not in taken and fits(lane.jobs[0], first) and rows(lane.jobs[0]) <= room:
                self._count -= 1
                return chosen.pop(key, next(self._order))
        return None

    def _class(self, job: Job[Any]) -> _Class:
        return self._live if job.live else self._requests


def lane_of(job: Job[Any]) -> str:
    """The lane ``job`` waits in: its own, or for a stream's first frame, its client's lane of first frames."""
    return f"{client_of(job.lane)}/{FIRST_FRAMES}" if job.opening else job.lane


def client_of(lane: str) -> str:
    """The client a lane belongs to: lanes are named ``CLIENT/NAME`` (see ``auth.current_client``)."""
    return lane.rpartition("/")[0] or lane


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
