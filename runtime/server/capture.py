"""Pull mode: the server reads a source itself and broadcasts the results.

For embedded devices the server owns the probe or camera: each configured
capture reads its source at the source's own rate, runs it through a
``live`` stream scheduler (newest frame wins) and hands every result to all
subscribers. A slow subscriber loses its oldest undelivered results, never
slowing the capture or the other subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from edgescope.errors import ConfigError, EdgescopeError, ModelNotFoundError
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

SUBSCRIBER_BACKLOG = 8

# Schedules a capture's frames like a stream's and yields their answers in order.
RunStream = Callable[[AsyncIterable[stream_pb2.Frame]], AsyncIterator[stream_pb2.Result]]


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    name: str
    source: str
    model: str
    loop: bool = True

    @classmethod
    def parse(cls, text: str) -> CaptureConfig:
        """``NAME=SOURCE@MODEL``, e.g. ``probe=video:/dev/video0@lesion-unet``."""
        name, eq, rest = text.partition("=")
        source, at, model = rest.rpartition("@")
        if not eq or not at or not name or not source or not model:
            raise ConfigError(f"capture {text!r} must look like NAME=SOURCE@MODEL")
        return cls(name=name, source=source, model=model)


class Subscription:
    """One subscriber's bounded view of a capture's results."""

    def __init__(self, hub: CaptureHub, name: str) -> None:
        self._hub = hub
        self._name = name
        self.queue: asyncio.Queue[stream_pb2.Result | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)

    def offer(self, result: stream_pb2.Result | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest: a live view wants the newest
        self.queue.put_nowait(result)

    def __aiter__(self) -> AsyncIterator[stream_pb2.Result]:
        return self._results()

    async def _results(self) -> AsyncIterator[stream_pb2.Result]:
        while (result := await self.queue.get()) is not None:
            yield result

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hub.unsubscribe(self._name, self)


class CaptureHub:
    """Runs the configured captures and fans their results out to subscribers."""

    def __init__(self, configs: list[CaptureConfig], run_stream: RunStream) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"capture names must be unique: {names}")
        self._configs = {c.name: c for c in configs}
        self._run_stream = run_stream
        self._subscribers: dict[str, set[Subscription]] = {c.name: set() for c in configs}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(c), name=f"capture-{c.name}") for c in self._configs.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.offer(None)

    def subscribe(self, name: str) -> Subscription:
        if not name and len(self._configs) == 1:
            name = next(iter(self._configs))
        if name not in self._configs:
            raise ModelNotFoundError(f"no capture named {name!r}; captures: {', '.join(self._configs) or '(none)'}")
        subscription = Subscription(self, name)
        self._subscribers[name].add(subscription)
        return subscription

    def unsubscribe(self, name: str, subscription: Subscription) -> None:
        self._subscribers[name].discard(subscription)

    async def _run(self, config: CaptureConfig) -> None:
        try:
            with open_source(config.source, loop=config.loop) as source:
                frames = _paced_frames(iter(source), source.kind, config)
                async for result in self._run_stream(frames):
                    for subscription in list(self._subscribers[config.name]):
                        subscription.offer(result)
        except EdgescopeError as exc:
            logger.error("capture %s stopped: %s", config.name, exc)
        for subscription in list(self._subscribers[config.name]):
            subscription.offer(None)


async def _paced_frames(
    frames: Iterator[SourceFrame], kind: str, config: CaptureConfig
) -> AsyncIterator[stream_pb2.Frame]:
    """Frames at the source's own rate (each frame's timestamp), read on a worker thread."""
    start = time.monotonic()
    seq = 0
    source_kind = stream_pb2.SourceKind.Value(f"SOURCE_KIND_{kind.upper()}")
    while (source_frame := await asyncio.to_thread(next, frames, None)) is not None:
        delay = start + source_frame.timestamp_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = stream_pb2.Frame(
            stream_id=f"capture:{config.name}",
            seq=seq,
            capture_time_ns=time.time_ns(),
            model=config.model,
            source_kind=source_kind,
            policy=stream_pb2.STREAM_POLICY_LIVE,
            raw=encode_raw(source_frame.pixels),
        )
        if source_frame.spacing_mm is not None:
            frame.spacing.row_mm, frame.spacing.column_mm = source_frame.spacing_mm
        seq += 1
        yield frame
