"""One stream's frames, from the first read to the last answer, owned by one task group.

Policies (``Frame.policy`` on the first frame, else the server default):

- ``live``: the newest frame wins. At most one frame waits; a newer frame
  replaces it and the replaced one is answered ``dropped: stale``.
- ``every``: every frame, in order; a full window stops the stream being
  read, so gRPC flow control slows the client down instead of dropping.

A ``StreamRun`` owns its reader, its dispatcher and one task per frame in
flight; when the run ends, for whatever reason, every one of them is
cancelled and awaited, so nothing outlives the stream. A frame is admitted
on the event loop (deadline, model, shared-memory slot) and handed to its
model's worker in one piece: the instance thread decodes, preprocesses,
infers, postprocesses and encodes it, and hands the Result back (see
``stages``). Frames are submitted in arrival order, at most one more than
the model has instances, so the worker starts the next frame as soon as it
is done with one; a model with recurrent state takes a stream's frames one
by one. Every frame read gets exactly one answer, in
arrival order, set by whoever owns the frame at that moment: the reader (a
stale or shutdown drop), the frame's task (its result, error or deadline
drop), or the shutdown cut (frames still in flight when the drain time is up).

Memory per stream is bounded: at most ``window_frames`` frames are held
between being read and their answer being sent, whatever the client or the
consumer of the answers does.

Deadlines count from capture: a frame's budget (``Frame.deadline_ms``, else
the server's) starts at its ``capture_time_ns``, mapped onto the server's
clock by the stream's least delay seen so far (the client's clock may be
offset from the server's; a frame that waited in the transport shows as
delay above that least one), or at its arrival when it carries no capture
time. A frame already past its deadline when read is answered at once;
the deadline travels with the frame into the model's queue, where an expired
frame is never run; a frame still at the model when its deadline comes is
answered then, and its result discarded when it arrives. Each of these is
answered ``dropped: deadline``, or, when the frame asked for it
(``process_late``), processed in full and flagged ``late``. Either way it
counts as a deadline miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from edgescope.errors import DeadlineExpiredError, EdgescopeError, FrameError
from edgescope.runtime.pipeline.decode import (
    DEFAULT_LIMITS,
    MAX_NAME_CHARS,
    FrameLimits,
    SharedMemoryView,
    check_frame_fields,
)
from edgescope.runtime.pipeline.state import StreamState, frame_source, is_stateful, source_inputs
from edgescope.runtime.server.auth import current_client
from edgescope.runtime.server.pairing import Pairer, PairingSettings, capture_ns
from edgescope.runtime.server.registry import ModelRegistry, ServedModel
from edgescope.runtime.server.stages import Finished, FramePixels, answer, frame_jobs, job_for
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")


# Frames read but not yet answered, per stream: ``parallel`` + 1 at the model's worker, one waiting,
# answers on their way out.
def window_frames(parallel: int) -> int:
    return 4 + 2 * parallel


EVERY_QUEUE_FRAMES = 1

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


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: stream_pb2.StreamPolicy.ValueType = stream_pb2.STREAM_POLICY_EVERY
    deadline_ms: int = 0
    # What one frame may make the server do: pixels decoded, extra models run.
    frame_limits: FrameLimits = DEFAULT_LIMITS


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


class _LiveSlot:
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


@dataclass(slots=True)
class Outcome:
    """How a stream ended, for its final gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


class StreamRun:
    """Schedules one stream; ``results`` yields one answer per frame read, in order."""

    def __init__(
        self,
        models: ModelRegistry,
        config: SchedulerConfig,
        metrics: RuntimeMetrics,
        lane: str,
        shared_memory: SharedMemoryView | None = None,
        parallel: int = 1,
    ) -> None:
        self._models = models
        self._config = config
        self._metrics = metrics
        self._shared_memory = shared_memory
        self.lane = lane
        self._answers: asyncio.Queue[Work | None] = asyncio.Queue()
        self._window = asyncio.Semaphore(window_frames(parallel))
        # Frames at the model's worker: one per instance, and the next one queued so no instance waits
        # for the event loop between two frames. Their answers still leave in order.
        self._at_worker = asyncio.Semaphore(parallel + 1)
        # A model that carries state from frame to frame takes a stream's frames strictly one at a time.
        self._sequential = asyncio.Lock()
        self._clock = CaptureClock()
        self._policy: stream_pb2.StreamPolicy.ValueType = config.policy
        self._policy_known = asyncio.Event()
        self._live = _LiveSlot()
        self._every: asyncio.Queue[Work | None] = asyncio.Queue(EVERY_QUEUE_FRAMES)
        self._tasks = TaskSet()
        self._reader: asyncio.Task[None] | None = None
        self._unanswered: set[Work] = set()
        self._model = ""
        # Recurrent state and previous frames live as long as this stream.
        self._state = StreamState()
        self._draining = False
        self._cut = False
        self._read_error = ""
        self.stream_ids: set[str] = set()
        # A stream of several sources for one model: made on its first frame that names a source.
        self.pairer: Pairer[Work] | None = None
        self._paired: list[Work] = []
        self.sent = 0
        self.shutdown_drops = 0

    # -- the answers, in order ---------------------------------------------------------------------

    async def results(self, frames: AsyncIterable[stream_pb2.Frame]) -> AsyncIterator[stream_pb2.Result]:
        """Answer every frame read from ``frames``, in order; the run's tasks end with it."""
        self._reader = self._tasks.spawn(self._read(frames), name=f"{self.lane}-reader")
        self._tasks.spawn(self._dispatch(), name=f"{self.lane}-dispatcher")
        try:
            while (work := await self._answers.get()) is not None:
                result = await work.answer()
                residence_ns = self._seal(work, result)
                yield result
                self.sent += 1
                self._window.release()
                self._metrics.observe_result(self._label(result), result.stream_id, result, residence_ns)
                if work.preview is not None:
                    self._metrics.set_preview(result.stream_id, work.preview)
        finally:
            await self._tasks.close()

    def _seal(self, work: Work, result: stream_pb2.Result) -> int:
        """Last checks before the answer leaves: the deadline at send, alerts, the server's clock stamps."""
        now_ns = time.perf_counter_ns()
        residence_ns = now_ns - work.received_ns
        frame = work.frame
        if result.status.code == stream_pb2.FRAME_STATUS_CODE_OK and work.expired(now_ns):
            if frame.process_late:
                result.status.late = True
            else:
                result.Clear()
                result.MergeFrom(dropped(frame, stream_pb2.DROP_REASON_DEADLINE))
        if result.status.code == stream_pb2.FRAME_STATUS_CODE_OK:
            result.alerts.extend(self._metrics.alerts_for(self._label(result), residence_ns))
        result.server_receive_time_ns = work.received_wall_ns
        result.server_send_time_ns = time.time_ns()
        return residence_ns

    def _label(self, result: stream_pb2.Result) -> str:
        return result.provenance.model or self._model

    def outcome(self) -> Outcome:
        """The stream's final status, once ``results`` is exhausted."""
        if self._read_error:
            return Outcome(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the stream could not be read after {self.sent} frame(s), each of which was answered: "
                f"{self._read_error}",
            )
        if self._cut or self.shutdown_drops:
            return Outcome(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is shutting down: {self.sent} frame(s) answered, "
                f"{self.shutdown_drops} of them dropped for shutdown; send the rest to another server",
            )
        return Outcome()

    # -- shutdown ----------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """From now on, frames read are answered ``dropped: shutdown``; frames already read finish."""
        self._draining = True

    async def cut(self) -> None:
        """The drain time is up: stop reading, answer every frame still in flight ``dropped: shutdown``."""
        self._cut = True
        await self._tasks.close()
        for work in sorted(self._unanswered, key=lambda w: w.received_ns):
            self._drop(work, stream_pb2.DROP_REASON_SHUTDOWN)
        self._answers.put_nowait(None)

    # -- reading and dispatching -------------------------------------------------------------------

    def _drop(self, work: Work, reason: stream_pb2.DropReason.ValueType) -> None:
        if reason == stream_pb2.DROP_REASON_SHUTDOWN:
            self.shutdown_drops += 1
        self._settle(work, dropped(work.frame, reason))

    def _settle(self, work: Work, result: stream_pb2.Result) -> None:
        self._unanswered.discard(work)
        work.resolve(result)

    async def _read(self, frames: AsyncIterable[stream_pb2.Frame]) -> None:
        iterator = aiter(frames)
        try:
            while True:
                await self._window.acquire()
                try:
                    frame = await anext(iterator)
                except StopAsyncIteration:
                    self._window.release()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # An unparseable message or a broken transport: answer what was read, then end non-OK.
                    self._window.release()
                    self._read_error = _read_error_text(exc)
                    break
                refusal = _refusal(frame, self._config.frame_limits)
                work = Work(frame)
                budget_ms = frame.deadline_ms or self._config.deadline_ms
                if budget_ms > 0:
                    age_ns = self._clock.age_ns(frame, work.received_wall_ns)
                    work.deadline_ns = work.received_ns - age_ns + budget_ms * 1_000_000
                self.stream_ids.add(frame.stream_id)
                self._unanswered.add(work)
                self._answers.put_nowait(work)
                if not self._policy_known.is_set():
                    self._policy = frame.policy or self._config.policy
                    self._policy_known.set()
                if refusal is None and frame.source:
                    refusal = self._pairing_refusal(frame)
                if refusal is not None:
                    self._settle(work, failed(frame, refusal))
                elif self._draining:
                    self._drop(work, stream_pb2.DROP_REASON_SHUTDOWN)
                elif self.pairer is not None and frame.source:
                    self.pairer.add(work)
                    while self._paired:
                        await self._schedule(self._paired.pop(0))
                else:
                    await self._schedule(work)
        finally:
            self._policy_known.set()
            if self.pairer is not None:
                self.pairer.close()
            self._live.close()
        await self._every.put(None)

    async def _schedule(self, work: Work) -> None:
        """Queue a frame for its model by the stream's policy."""
        if self._policy == stream_pb2.STREAM_POLICY_LIVE:
            replaced = self._live.put(work)
            if replaced is not None:
                self._drop(replaced, stream_pb2.DROP_REASON_STALE)
        else:
            await self._every.put(work)

    # -- several sources ---------------------------------------------------------------------------

    def _pairing_refusal(self, frame: stream_pb2.Frame) -> FrameError | None:
        """Start pairing on the first frame that names a source; refuse a source the model does not take."""
        if self.pairer is None:
            name = frame.model or self._model
            try:
                manifest = self._models.get(name).manifest
                settings = PairingSettings.of(frame.pairing)
            except (EdgescopeError, ValueError) as exc:
                return FrameError(str(exc))
            others = [binding.source for binding in source_inputs(manifest)]
            if not others:
                return FrameError(
                    f"model {name} takes frames of one source; send them without Frame.source "
                    f"(it names the source of a frame for a model fed by several)"
                )
            self.pairer = Pairer(
                frame_source(manifest), others, settings, self._on_set, self._on_taken, self._on_unpaired
            )
        if frame.source not in self.pairer.sources:
            return FrameError(
                f"source {frame.source[:MAX_NAME_CHARS]!r} is not one the model takes "
                f"(its sources: {', '.join(self.pairer.sources)})"
            )
        return None

    def _on_set(self, lead: Work, partners: dict[str, Work]) -> None:
        lead.partners = partners
        self._paired.append(lead)

    def _on_taken(self, partner: Work, lead: Work) -> None:
        if partner.answered:
            return
        result = answer_for(partner.frame)
        result.status.code = stream_pb2.FRAME_STATUS_CODE_PAIRED
        result.status.reason = f"paired: in the set of {lead.frame.source} frame {lead.frame.seq}, whose result it is"
        result.pairing.source = partner.frame.source
        result.pairing.lead_seq = lead.frame.seq
        result.pairing.tolerance_ms = self.pairer.tolerance_ms() if self.pairer is not None else 0.0
        self._settle(partner, result)

    def _on_unpaired(self, work: Work) -> None:
        # A frame answered meanwhile (the shutdown cut) keeps that answer.
        if not work.answered:
            self._drop(work, stream_pb2.DROP_REASON_UNPAIRED)

    async def _dispatch(self) -> None:
        await self._policy_known.wait()
        is_live = self._policy == stream_pb2.STREAM_POLICY_LIVE
        while True:
            await self._at_worker.acquire()
            work = await (self._live.take() if is_live else self._every.get())
            if work is None:
                self._at_worker.release()
                break
            self._tasks.spawn(self._process(work), name=f"{self.lane}-frame-{work.frame.seq}")
        # The reader has queued every frame's answer ahead of this end mark.
        self._answers.put_nowait(None)

    # -- one frame ---------------------------------------------------------------------------------

    async def _process(self, work: Work) -> None:
        """Admit one frame, then hand it to its model(s); a place at the worker is already held."""
        frame = work.frame
        try:
            late = work.expired()
            if late and not frame.process_late:
                self._drop(work, stream_pb2.DROP_REASON_DEADLINE)
                return
            if frame.model:
                self._model = frame.model
            finished = await run_frame(
                self._models,
                frame,
                self._model,
                FramePixels(frame, self._shared_memory, self._config.frame_limits),
                work.received_ns,
                self.lane,
                self._state,
                want_thumbnail=self._metrics.preview_due(frame.stream_id),
                # A frame that may be late is run in full; any other is given up when its deadline comes.
                deadline_ns=None if frame.process_late else work.deadline_ns,
                sequential=self._sequential,
                partners=self._partner_pixels(work),
            )
            if work.partners is not None:
                _describe_set(finished.result, work, self.pairer)
            finished.result.status.late = late or work.expired()
            work.preview = finished.preview
            self._settle(work, finished.result)
        except asyncio.CancelledError:
            raise
        except DeadlineExpiredError:
            self._drop(work, stream_pb2.DROP_REASON_DEADLINE)
        except EdgescopeError as exc:
            self._settle(work, failed(frame, exc))
        except Exception as exc:
            logger.exception("frame %s/%d failed unexpectedly", frame.stream_id, frame.seq)
            self._settle(work, failed(frame, exc))
        finally:
            self._at_worker.release()

    def _partner_pixels(self, work: Work) -> dict[str, FramePixels] | None:
        if work.partners is None:
            return None
        return {
            source: FramePixels(partner.frame, self._shared_memory, self._config.frame_limits)
            for source, partner in work.partners.items()
        }


def _describe_set(result: stream_pb2.Result, lead: Work, pairer: Pairer[Work] | None) -> None:
    """A leading frame's result names its partners and how far from it each was captured."""
    lead_ns = capture_ns(lead)
    result.pairing.source = lead.frame.source
    result.pairing.tolerance_ms = pairer.tolerance_ms() if pairer is not None else 0.0
    for source, partner in (lead.partners or {}).items():
        result.pairing.partners.add(
            source=source,
            seq=partner.frame.seq,
            capture_time_ns=partner.frame.capture_time_ns,
            skew_ns=capture_ns(partner) - lead_ns,
        )


async def run_frame(
    models: ModelRegistry,
    frame: stream_pb2.Frame,
    model: str,
    pixels: FramePixels,
    received_ns: int,
    lane: str,
    state: StreamState,
    *,
    want_thumbnail: bool = False,
    deadline_ns: int | None = None,
    sequential: asyncio.Lock | None = None,
    partners: Mapping[str, FramePixels] | None = None,
) -> Finished:
    """One frame on ``model`` and its extra models, each leased for the time it takes.

    A model with recurrent state takes the frames of one ``sequential`` lock's holder one by one.
    """
    leases: list[ServedModel] = []
    try:
        for name in (model, *frame.extra_models):
            leases.append(models.lease(name))
        jobs = frame_jobs(frame, leases, pixels, received_ns, want_thumbnail, partners)
        stateful = sequential is not None and any(is_stateful(job.model.manifest) for job in jobs)
        async with sequential if stateful and sequential is not None else contextlib.nullcontext():
            # One model after another: a frame's extra models are rare, and each keeps its own order.
            finished = [
                await _in_time(job.model.infer(job_for(job, lane, state, frame.reset_state, deadline_ns)), deadline_ns)
                for job in jobs
            ]
        return answer(jobs, finished)
    finally:
        for leased in leases:
            models.release(leased)


async def _in_time(answer: Awaitable[T], deadline_ns: int | None) -> T:
    """``answer``, or ``DeadlineExpiredError`` once ``deadline_ns`` has passed (the job is withdrawn, or its
    result is discarded when it arrives)."""
    if deadline_ns is None:
        return await answer
    try:
        return await asyncio.wait_for(answer, max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9))
    except asyncio.TimeoutError:
        raise DeadlineExpiredError("the frame's deadline passed while it was at the model") from None


def _refusal(frame: stream_pb2.Frame, limits: FrameLimits) -> FrameError | None:
    """Why a frame is refused as soon as it is read (a caller-chosen name or list out of bounds), if it is;
    its stream id is then cut, so the answer and what records it stay small."""
    try:
        check_frame_fields(frame, limits)
    except FrameError as exc:
        frame.stream_id = frame.stream_id[:MAX_NAME_CHARS]
        return exc
    return None


def _read_error_text(exc: Exception) -> str:
    # protobuf's DecodeError names the message type and what was corrupt; bounded, it may echo input.
    return f"{type(exc).__name__}: {exc}"[:500]


async def infer_one(
    models: ModelRegistry,
    frame: stream_pb2.Frame,
    lane: str,
    shared_memory: SharedMemoryView | None = None,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> stream_pb2.Result:
    """One frame on its model(s), for ``Infer``; raises ``EdgescopeError`` for bad input or a failing model.

    No stream: a stateful model starts from its initial state.
    """
    received_ns = time.perf_counter_ns()
    check_frame_fields(frame, limits)
    pixels = FramePixels(frame, shared_memory, limits)
    finished = await run_frame(models, frame, frame.model, pixels, received_ns, lane, StreamState())
    return finished.result


class StreamRegistry:
    """Every stream the server is running, so shutdown can answer each one's frames."""

    def __init__(self) -> None:
        self._runs: set[StreamRun] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._count = 0

    def next_lane(self, kind: str) -> str:
        """A lane of its own at the models' workers, for one stream of the current client."""
        self._count += 1
        return f"{current_client()}/{kind}-{self._count}"

    def add(self, run: StreamRun) -> None:
        if self.draining:
            run.begin_drain()
        self._runs.add(run)
        self._idle.clear()

    def remove(self, run: StreamRun) -> None:
        self._runs.discard(run)
        if not self._runs:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Answer every frame received; frames still in flight after ``timeout_s`` are dropped. True if none were."""
        self.draining = True
        for run in list(self._runs):
            run.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            pass
        for run in list(self._runs):
            await run.cut()
        return False

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


def unary_lane() -> str:
    """The one lane at the models' workers that all the current client's unary calls share."""
    return f"{current_client()}/unary"
