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
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import grpc

from edgescope.errors import DeadlineExpiredError, EdgescopeError, FrameError
from edgescope.runtime.pipeline.decode import (
    DEFAULT_LIMITS,
    MAX_NAME_CHARS,
    FrameLimits,
    SharedMemoryView,
    check_frame_fields,
)
from edgescope.runtime.pipeline.drift import StreamDrift
from edgescope.runtime.pipeline.signal import signal_refusal, signal_specs
from edgescope.runtime.pipeline.state import StreamState, frame_source, source_inputs
from edgescope.runtime.server.auth import current_client
from edgescope.runtime.server.frame_run import run_frame
from edgescope.runtime.server.pairing import Pairer, PairingSettings, capture_ns
from edgescope.runtime.server.registry import ModelRegistry
from edgescope.runtime.server.stages import FramePixels
from edgescope.runtime.server.stream_work import CaptureClock, LiveSlot, TaskSet, Work, answer_for, dropped, failed
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import manifest_pb2, stream_pb2

logger = logging.getLogger(__name__)


# Frames read but not yet answered, per stream: ``parallel`` + 1 at the model's worker, one waiting,
# answers on their way out.
def window_frames(parallel: int) -> int:
    return 4 + 2 * parallel


EVERY_QUEUE_FRAMES = 1


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: stream_pb2.StreamPolicy.ValueType = stream_pb2.STREAM_POLICY_EVERY
    deadline_ms: int = 0
    # What one frame may make the server do: pixels decoded, extra models run.
    frame_limits: FrameLimits = DEFAULT_LIMITS


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
        self._live = LiveSlot()
        self._every: asyncio.Queue[Work | None] = asyncio.Queue(EVERY_QUEUE_FRAMES)
        self._tasks = TaskSet()
        self._reader: asyncio.Task[None] | None = None
        self._unanswered: set[Work] = set()
        self._model = ""
        # Whether a frame has gone to a model yet: the first gives way to streams already running.
        self._opened = False
        # Recurrent state and previous frames live as long as this stream.
        self._state = StreamState()
        self._draining = False
        self._cut = False
        self._read_error = ""
        self.stream_ids: set[str] = set()
        # A stream of several sources for one model: made on its first frame that names a source.
        self.pairer: Pairer[Work] | None = None
        self._signals: dict[str, manifest_pb2.SignalSpec] = {}  # the model's signal sources: windows checked as read
        # True while the reader waits for a busy model to take a frame: pairing's waits stand still then,
        # since the frames behind are already sent (waiting for the client or the window, they run).
        self._held_back = False
        self._paired: list[Work] = []
        self.sent = 0
        self.shutdown_drops = 0
        # The stream's domain drift test, over its answers in order.
        self._drift = StreamDrift(lane, models.audit)

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
            self._drift.observe(result)
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
                    self._held_back = True
                    try:
                        while self._paired:
                            await self._schedule(self._paired.pop(0))
                    finally:
                        self._held_back = False
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
            self._model = name
            others = [binding.source for binding in source_inputs(manifest)]
            if not others:
                return FrameError(
                    f"model {name} takes frames of one source; send them without Frame.source "
                    f"(it names the source of a frame for a model fed by several)"
                )
            self._signals = signal_specs(manifest)
            self.pairer = Pairer(
                frame_source(manifest),
                others,
                settings,
                self._on_set,
                self._on_taken,
                self._on_unpaired,
                lambda: not self._held_back,
            )
        if frame.source not in self.pairer.sources:
            return FrameError(
                f"source {frame.source[:MAX_NAME_CHARS]!r} is not one the model takes "
                f"(its sources: {', '.join(self.pairer.sources)})"
            )
        return signal_refusal(frame, self._signals)

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
            result = dropped(work.frame, stream_pb2.DROP_REASON_UNPAIRED)
            result.pairing.source = work.frame.source
            for source, seconds in (self.pairer.silent(work) if self.pairer is not None else {}).items():
                result.alerts.add(
                    kind=stream_pb2.Alert.KIND_SOURCE_SILENT,
                    model=self._model,
                    value=min(seconds, 1e9),
                    message=f"source {source} has sent no frame near this one"
                    + (f" for {seconds:.1f} s" if seconds < float("inf") else " yet"),
                )
            self._settle(work, result)

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
            opening, self._opened = not self._opened, True
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
                live=True,
                opening=opening,
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
