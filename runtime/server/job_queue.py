"""Which of a model's waiting jobs runs next, and which may share its batch.

Jobs wait in lanes, one per stream and one per client for all of its unary
calls (``Infer``, KServe ``ModelInfer``), served round-robin within their
class. There are two classes:

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

A batch holds jobs of one class only, one per lane: on a CPU a batch of n
rows costs nearly n inferences, so a live frame that took a request's rows
as company would wait for them, and a stream whose next frame joined its
own batch would make this one wait for it.

Not thread-safe: the worker calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgescope.runtime.server.workers import Job

# The least share of the model's time that waiting requests get while live frames wait too.
REQUEST_SHARE = 0.25
_LIVE_PER_REQUEST = (1.0 - REQUEST_SHARE) / REQUEST_SHARE
# Requests that ran while no live frame waited put them in debt, but only this far: a live
# source that starts after a quiet spell must not lock the requests out for long.
MAX_REQUEST_DEBT_NS = 100_000_000


class JobQueue:
    """Lanes of waiting jobs in two classes; see the module docstring."""

    def __init__(self) -> None:
        self._live: OrderedDict[str, deque[Job[Any]]] = OrderedDict()
        self._requests: OrderedDict[str, deque[Job[Any]]] = OrderedDict()
        self._count = 0
        # Model time owed to the requests (ns): earned while live frames ran ahead of them, spent by their runs.
        self._owed_ns = 0.0

    def __len__(self) -> int:
        return self._count

    def put(self, job: Job[Any]) -> None:
        self._classes(job).setdefault(job.lane, deque()).append(job)
        self._count += 1

    def withdraw(self, job: Job[Any]) -> bool:
        """Take ``job`` out if it is still waiting; True when it was."""
        lanes = self._classes(job)
        lane = lanes.get(job.lane)
        if lane is None or job not in lane:
            return False
        lane.remove(job)
        self._count -= 1
        if not lane:
            del lanes[job.lane]
        return True

    def pop_head(self) -> tuple[Job[Any], int]:
        """The next job by class and round-robin, and its charge for ``charge`` (the queue must not be empty).

        The charge is +1 for a live job run while requests wait, -1 for a
        request, 0 for a live job that waited alone.
        """
        live = bool(self._live) and (not self._requests or self._owed_ns <= 0)
        lanes = self._live if live else self._requests
        key, lane = next(iter(lanes.items()))
        charge = (1 if self._requests else 0) if live else -1
        return self._pop(lanes, key, lane), charge

    def charge(self, charge: int, elapsed_ns: int) -> None:
        """Account a batch's run time to the requests' share (``charge`` from ``pop_head``)."""
        if charge > 0:
            self._owed_ns += elapsed_ns / _LIVE_PER_REQUEST
        elif charge < 0:
            self._owed_ns = max(-MAX_REQUEST_DEBT_NS, self._owed_ns - elapsed_ns)

    def company_waiting(self, first: Job[Any]) -> int:
        """How many other lanes of ``first``'s class have a job at their head that could share its batch."""
        return sum(1 for key, lane in self._classes(first).items() if key != first.lane and fits(lane[0], first))

    def pop_company(self, first: Job[Any], taken: set[str], room: int) -> Job[Any] | None:
        """The head of the next lane of ``first``'s class, not in ``taken``, that fits in ``room`` rows."""
        lanes = self._classes(first)
        for key, lane in lanes.items():
            if key not in taken and fits(lane[0], first) and rows(lane[0]) <= room:
                return self._pop(lanes, key, lane)
        return None

    def _classes(self, job: Job[Any]) -> OrderedDict[str, deque[Job[Any]]]:
        return self._live if job.live else self._requests

    def _pop(self, lanes: OrderedDict[str, deque[Job[Any]]], key: str, lane: deque[Job[Any]]) -> Job[Any]:
        job = lane.popleft()
        self._count -= 1
        # Round-robin: the lane goes to the back, or away when empty.
        del lanes[key]
        if lane:
            lanes[key] = lane
        return job


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
