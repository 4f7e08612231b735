"""Pull mode: the server reads a source itself and broadcasts the results.

For embedded devices the server owns the probe or camera: each configured
capture reads its source at the source's own rate, runs it through a
``live`` stream scheduler (newest frame wins) and hands every result to all
subscribers. A slow subscriber loses its oldest undelivered results, never
slowing the capture or the other subscribers.

A capture that cannot open its source, or whose source stops, is down: its
gRPC health service (``edgescope.capture.<name>``) turns NOT_SERVING, the
metrics count it and raise the ``capture_unavailable`` alert, and every
subscriber's stream ends with ``CaptureUnavailableError`` carrying the
reason (Subscribe answers it with UNAVAILABLE). The capture then opens its
source again, waiting ``RETRY_BACKOFF_S`` between tries and doubling up to
``MAX_RETRY_BACKOFF_S``; health turns SERVING again with its first result.
A finite source (a file without ``loop``) that simply ends is finished, not
failed: its subscribers' streams end normally.

A capture of a model fed by several sources reads them all
(``NAME=white=SPEC|nir=SPEC@MODEL``): their frames go in presentation-time
order, each stamped on the sources' clock from the capture's start, and
are paired as a client's streams are (``pairing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from grpc_health.v1 import health_pb2

from edgescope.errors import ConfigError, EdgescopeError, ModelNotFoundError, SourceError
from edgescope.runtime.pipeline.decode import encode_raw_into
from edgescope.runtime.server.capture_archive import CaptureArchive
from edgescope.runtime.sources import FrameSource, SourceFrame
from edgescope.runtime.sources.merged import named_sources, open_sources
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

SUBSCRIBER_BACKLOG = 8
# On stop, a capture stops reading and has this long to answer the frames it holds.
STOP_GRACE_S = 5.0
RETRY_BACKOFF_S = 1.0
MAX_RETRY_BACKOFF_S = 30.0
HEALTH_PREFIX = "edgescope.capture."

# Schedules a capture's frames like a stream's and yields their answers in order.
RunStream = Callable[[AsyncIterable[stream_pb2.Frame]], AsyncIterator[stream_pb2.Result]]

# Sets a gRPC health service's status: (service name, serving).
HealthSetter = Callable[[str, bool], Awaitable[None]]


def health_service_name(capture: str) -> str:
    """The gRPC health service that says whether capture ``capture`` is delivering results."""
    return HEALTH_PREFIX + capture


def grpc_health_setter(servicer: Any) -> HealthSetter:
    """Sets capture health on a ``grpc_health`` asyncio HealthServicer."""

    async def set_status(service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await servicer.set(service, status)

    return set_status


class CaptureUnavailableError(SourceError):
    """A capture cannot open or read its source; the message says why."""


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    name: str
    source: str
    model: str
    loop: bool = True

    @classmethod
    def parse(cls, text: str) -> CaptureConfig:
        """``NAME=SOURCE@MODEL``, e.g. ``probe=v4l2:/dev/video0@lesion-unet``; SOURCE may be several
        ``SOURCE_NAME=SPEC`` joined by ``|`` for a model fed by several sources."""
        name, eq, rest = text.partition("=")
        source, at, model = rest.rpartition("@")
        if not eq or not at or not name or not source or not model:
            raise ConfigError(f"capture {text!r} must look like NAME=SOURCE@MODEL")
        return cls(name=name, source=source, model=model)


@dataclass(slots=True)
class _End:
    """The end of a subscription: normal (no reason) or because the capture went down."""

    reason: str = ""


class Subscription:
    """One subscriber's bounded view of a capture's results."""

    def __init__(self, hub: CaptureHub, name: str) -> None:
        self._hub = hub
        self._name = name
        self.queue: asyncio.Queue[stream_pb2.Result | _End] = asyncio.Queue(SUBSCRIBER_BACKLOG)

    def offer(self, result: stream_pb2.Result) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest: a live view wants the newest
        self.queue.put_nowait(result)

    def end(self, reason: str = "") -> None:
        """No more results; with a reason, iteration raises CaptureUnavailableError."""
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(_End(reason))

    def __aiter__(self) -> AsyncIterator[stream_pb2.Result]:
        return self._results()

    async def _results(self) -> AsyncIterator[stream_pb2.Result]:
        while not isinstance(item := await self.queue.get(), _End):
            yield item
        if item.reason:
            raise CaptureUnavailableError(item.reason)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hub.unsubscribe(self._name, self)


@dataclass(slots=True)
class _State:
    """Whether a capture delivers, and why not when it does not."""

    up: bool = False
    reason: str = "starting"
    failures: int = 0
    subscribers: set[Subscription] = field(default_factory=set)


class CaptureHub:
    """Runs the configured captures, watches their health and fans their results out to subscribers."""

    def __init__(
        self,
        configs: list[CaptureConfig],
        run_stream: RunStream,
        metrics: RuntimeMetrics,
        health: HealthSetter | None = None,
        *,
        retry_backoff_s: float = RETRY_BACKOFF_S,
        max_retry_backoff_s: float = MAX_RETRY_BACKOFF_S,
        archive: CaptureArchive | None = None,
    ) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"capture names must be unique: {names}")
        if archive is not None:
            for c in configs:
                if "|" in c.source or c.source.strip().lower().startswith("dicom:"):
                    raise ConfigError(
                        f"capture {c.name}: --results-to stores the key frames of a capture of one source that is "
                        "not DICOM (a dicom: source has its own study; edgescope stream --results-to writes it)"
                    )
        self._configs = {c.name: c for c in configs}
        self._run_stream = run_stream
        self._metrics = metrics
        self._health = health
        self._retry = (retry_backoff_s, max_retry_backoff_s)
        self._states = {c.name: _State() for c in configs}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._archive = archive

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(c), name=f"capture-{c.name}") for c in self._configs.values()]

    async def stop(self) -> None:
        """Stop reading, answer what is in flight (up to STOP_GRACE_S), then end every subscription; the
        results kept for the archive are written and delivered (see ``capture_archive``)."""
        self._stopping.set()
        if self._archive is not None:
            self._archive.stopping()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._archive is not None:
            await self._archive.close()
        for state in self._states.values():
            for subscription in state.subscribers:
                subscription.end()

    def subscribe(self, name: str) -> Subscription:
        """A new subscriber; raises CaptureUnavailableError while the capture is down."""
        if not name and len(self._configs) == 1:
            name = next(iter(self._configs))
        if name not in self._configs:
            raise ModelNotFoundError(f"no capture named {name!r}; captures: {', '.join(self._configs) or '(none)'}")
        state = self._states[name]
        if not state.up and state.failures:
            raise CaptureUnavailableError(f"capture {name} is down: {state.reason}")
        subscription = Subscription(self, name)
        state.subscribers.add(subscription)
        return subscription

    def unsubscribe(self, name: str, subscription: Subscription) -> None:
        self._states[name].subscribers.discard(subscription)

    async def _run(self, config: CaptureConfig) -> None:
        await self._set_health(config.name, serving=False)
        backoff, max_backoff = self._retry
        while not self._stopping.is_set():
            try:
                source = await asyncio.to_thread(open_sources, named_sources(config.source.split("|")), config.loop)
            except EdgescopeError as exc:
                await self._down(config, f"cannot open {config.source}: {exc}")
                await self._pause(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            failure = await self._serve(config, source)
            if failure is None or self._stopping.is_set():
                await self._finished(config)
                return
            # A source that delivered before it failed starts its retries afresh.
            if self._states[config.name].up:
                backoff = self._retry[0]
            await self._down(config, failure)
            await self._pause(backoff)
            backoff = min(backoff * 2, max_backoff)

    async def _pause(self, seconds: float) -> None:
        """Wait before the next try; stopping ends the wait."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _serve(self, config: CaptureConfig, source: FrameSource) -> str | None:
        """Run the source until it ends (None) or fails (the reason)."""
        failure: list[str] = []
        archive = self._archive
        with source:
            sent = None
            if archive is not None:
                archive.started(config.name, source.kind)
                sent = functools.partial(archive.sent, config.name)
            fractional = archive is not None and archive.settings.seg_type == "fractional"
            frames = _paced_frames(iter(source), source.kind, config, failure, self._stopping, sent, fractional)
            results = self._run_stream(frames)
            try:
                async for result in results:
                    if not self._states[config.name].up:
                        await self._up(config)
                    for subscription in list(self._states[config.name].subscribers):
                        subscription.offer(result)
                    if archive is not None:
                        archive.answered(config.name, result)
            except EdgescopeError as exc:
                failure.append(str(exc))
            finally:
                # Closed here, not left to garbage collection, so the stream's own cleanup runs now.
                if isinstance(results, AsyncGenerator):
                    await results.aclose()
                if archive is not None:
                    archive.ended(config.name)
        return failure[0] if failure else None

    async def _up(self, config: CaptureConfig) -> None:
        state = self._states[config.name]
        state.up, state.reason = True, ""
        self._metrics.observe_capture(config.name, up=True)
        await self._set_health(config.name, serving=True)
        logger.info("capture %s is delivering", config.name)

    async def _down(self, config: CaptureConfig, reason: str) -> None:
        state = self._states[config.name]
        state.up, state.reason = False, reason
        state.failures += 1
        self._metrics.observe_capture(config.name, up=False, reason=reason)
        await self._set_health(config.name, serving=False)
        logger.error("capture %s is down: %s; retrying", config.name, reason)
        for subscription in list(state.subscribers):
            subscription.end(f"capture {config.name} is down: {reason}")
        state.subscribers.clear()

    async def _finished(self, config: CaptureConfig) -> None:
        state = self._states[config.name]
        state.up, state.reason = False, "the source ended"
        await self._set_health(config.name, serving=False)
        for subscription in list(state.subscribers):
            subscription.end()
        state.subscribers.clear()

    async def _set_health(self, name: str, *, serving: bool) -> None:
        if self._health is not None:
            await self._health(health_service_name(name), serving)


async def _paced_frames(
    frames: Iterator[SourceFrame],
    kind: str,
    config: CaptureConfig,
    failure: list[str],
    stopping: asyncio.Event,
    sent: Callable[[int, SourceFrame], None] | None = None,
    want_probabilities: bool = False,
) -> AsyncIterator[stream_pb2.Frame]:
    """Frames at the source's own rate (each frame's timestamp), read on a worker thread.

    A source that fails ends the frames and leaves its reason in ``failure``;
    ``stopping`` ends them at once (a read still blocked ends when the source is closed).
    ``sent`` is told of each frame (its seq and the source's frame) as it goes to the model.
    """
    start = time.monotonic()
    start_wall_ns = time.time_ns()
    seq = 0
    source_kind = stream_pb2.SourceKind.Value(f"SOURCE_KIND_{kind.upper()}")
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            reading = asyncio.ensure_future(asyncio.to_thread(next, frames, None))
            await asyncio.wait((reading, stop), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                return
            try:
                source_frame = reading.result()
            except EdgescopeError as exc:
                failure.append(str(exc))
                return
            if source_frame is None:
                return
            delay = start + source_frame.timestamp_s - time.monotonic()
            if delay > 0:
                await asyncio.wait((stop,), timeout=delay)
            if stopping.is_set():
                return
            # Frames of several sources carry their source's own time, so pairing sees when each was taken.
            stamp = start_wall_ns + int(source_frame.timestamp_s * 1e9) if source_frame.source else time.time_ns()
            if sent is not None:
                sent(seq, source_frame)
            yield _frame(source_frame, seq, source_kind, config, stamp, want_probabilities)
            seq += 1
    finally:
        stop.cancel()


def _frame(
    source_frame: SourceFrame,
    seq: int,
    source_kind: stream_pb2.SourceKind.ValueType,
    config: CaptureConfig,
    capture_time_ns: int,
    want_probabilities: bool = False,
) -> stream_pb2.Frame:
    frame = stream_pb2.Frame(
        stream_id=f"capture:{config.name}",
        seq=seq,
        capture_time_ns=capture_time_ns,
        model=config.model,
        source_kind=source_kind,
        policy=stream_pb2.STREAM_POLICY_LIVE,
        want_probabilities=want_probabilities,
    )
    encode_raw_into(frame.raw, source_frame.pixels)
    source_frame.describe(frame)
    return frame
