"""A stream's frames between being read and their answer: ``Work``, the answers a frame may get,
and the pieces a ``StreamRun`` is made of (its tasks, its capture clock, the live policy's slot)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from edgescope.errors import EdgescopeError
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

_DROP_TEXT = {
    stream_pb2.DROP_REASON_STALE: "stale: a newer frame arrived before this one started",
    stream_pb2.DROP_REASON_DEADLINE: "deadline: it could not be answered in time",
    stream_pb2.DROP_REASON_SHUTDOWN: "shutdown: the server is stopping",
    stream_pb2.DROP_REASON_UNPAIRED: "unpaired: no frame of the other source(s) was captured near enough to it",
}


def answer_for(frame: stream_pb2.Frame) -> stream_pb2.Result:
    return stream_pb2.Result(stream_id=frame.stream_id, seq=frame.seq, capture_time_ns=frame.capture_time_ns)


def dropped(frame: stream_pb2.Frame, reason: stream_pb2.DropReason.ValueType) -> stream_pb2.Result:
    result = answer_for(frame)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_DROPPED
    result.status.drop_reason = reason
    result.status.reason = _DROP_TEXT[reason]
    return result


def failed(frame: stream_pb2.Frame, error: Exception) -> stream_pb2.Result:
    result = answer_for(frame)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_ERROR
    if isinstance(error, EdgescopeError):
        result.status.reason = str(error)
    else:
        result.status.reason = f"internal error: {type(error).__name__}"
    return result


class TaskSet:
    """The tasks of one owner; ``close`` cancels and awaits every one still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.error("a stream task failed: %r", outcome)


class Work:
    """One frame read from a stream, until its answer is sent."""

    __slots__ = ("_answer", "deadline_ns", "frame", "partners", "preview", "received_ns", "received_wall_ns")

    def __init__(self, frame: stream_pb2.Frame) -> None:
        self.frame = frame
        self.received_ns = time.perf_counter_ns()
        self.received_wall_ns = time.time_ns()
        # When its budget runs out, on the perf_counter clock (None: no budget).
        self.deadline_ns: int | None = None
        self._answer: asyncio.Future[stream_pb2.Result] = asyncio.get_running_loop().create_future()
        self.preview: bytes | None = None
        # A frame leading a set of several sources' frames: the others, by source (see ``pairing``).
        self.partners: dict[str, Work] | None = None

    def expired(self, now_ns: int | None = None) -> bool:
        return self.deadline_ns is not None and (now_ns or time.perf_counter_ns()) > self.deadline_ns

    @property
    def answered(self) -> bool:
        return self._answer.done()

    def resolve(self, result: stream_pb2.Result) -> None:
        if self._answer.done():
            # A second answer for one frame is a bug in this module, never the client's doing.
            raise RuntimeError(f"frame {self.frame.stream_id}/{self.frame.seq} was answered twice")
        self._answer.set_result(result)

    async def answer(self) -> stream_pb2.Result:
        return await self._answer


class CaptureClock:
    """How long ago a stream's frames were captured, on the server's clock.

    The client stamps ``capture_time_ns`` on its own wall clock, which may be
    offset from the server's. The stream's least ``arrival - capture`` so far
    stands for that offset plus the fastest transit: what a frame shows above
    it is the time it spent queued on the way, which counts against its budget.
    """

    def __init__(self) -> None:
        self._least_ns: int | None = None

    def age_ns(self, frame: stream_pb2.Frame, received_wall_ns: int) -> int:
        if frame.capture_time_ns <= 0:
            return 0
        delay = received_wall_ns - frame.capture_time_ns
        if self._least_ns is None or delay < self._least_ns:
            self._least_ns = delay
        return delay - self._least_ns


class LiveSlot:
    """Holds at most one waiting frame; a newer one replaces it."""

    def __init__(self) -> None:
        self._item: Work | None = None
        self._closed = False
        self._changed = asyncio.Event()

    def put(self, item: Work) -> Work | None:
        replaced, self._item = self._item, item
        self._changed.set()
        return replaced

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def take(self) -> Work | None:
        while self._item is None:
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        item, self._item = self._item, None
        return item
