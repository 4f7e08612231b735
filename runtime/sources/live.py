"""What live sources share: a reader thread that keeps only the newest frame, and reconnection.

A camera or a network stream produces frames at its own pace whether or not
anyone keeps up. The reader thread reads them as they come and keeps the
newest one only (newest frame wins at the source), so a slow consumer gets
the latest picture, never a growing backlog of stale ones; ``replaced``
counts the frames it never saw.

When the device or the stream goes away, the reader closes it and opens it
again, waiting ``backoff`` before each try (doubling up to ``max_backoff``;
back to ``backoff`` once a connection has delivered frames for
``max_backoff``), so a stream that keeps dropping is not hammered. A stream
that says it has an end (a file served over the network: it has a
duration) ends the source when it ends, unless ``loop`` asks to play it
again. A consumer waits for a frame at most ``stall_timeout_s``; past that,
iteration ends with ``SourceError`` naming the last failure, so a stream
that does not come back is reported instead of waited on forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgescope.errors import EdgescopeError, SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind

__all__ = ["DEFAULT_LIVE_FPS", "FrameReader", "LiveSource", "Reconnect"]

logger = logging.getLogger(__name__)

DEFAULT_LIVE_FPS = 30.0
"""Rate assumed when a device or stream does not say its own."""

RGB8 = npt.NDArray[np.uint8]


class FrameReader(Protocol):
    """One open connection to a device or stream."""

    @property
    def fps(self) -> float | None:
        """The rate the device or stream declares, if it does."""
        ...

    @property
    def finite(self) -> bool:
        """True when the stream has a known length (a file served over a network): its end is an end."""
        ...

    def read(self) -> RGB8 | None:
        """The next frame, ``(H, W, 3)`` RGB uint8; None when the stream has ended.

        Raises SourceError when reading fails.
        """
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How a live source waits for its device or stream to come back."""

    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    # A consumer waits this long for a frame before the source is declared lost.
    stall_timeout_s: float = 5.0


class LiveSource:
    """A live device or stream as a frame source: endless, newest frame first.

    ``open_reader`` opens one connection (raising SourceError when it cannot);
    it is called once here, so a source that cannot be opened fails at
    construction with the reason, and again by the reader thread after each
    loss. ``timestamp_s`` is the time since the first frame arrived, so
    pacing by it sends each frame as soon as it is there.
    """

    def __init__(
        self,
        name: str,
        open_reader: Callable[[], FrameReader],
        *,
        kind: SourceKind = "endoscopy",
        reconnect: Reconnect | None = None,
        fps: float | None = None,
        loop: bool = False,
    ) -> None:
        self._name = name
        # Play a finite stream again when it ends, instead of ending with it.
        self._loop = loop
        self._ended = False
        self._open_reader = open_reader
        self._kind = kind
        self._reconnect = reconnect or Reconnect()
        self._condition = threading.Condition()
        self._latest: tuple[RGB8, float] | None = None
        self._arrived = 0
        self._taken = 0
        self._error: SourceError | None = None
        self._closed = threading.Event()
        reader = open_reader()
        self._fps = fps or reader.fps or DEFAULT_LIVE_FPS
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, args=(reader,), name=f"source-{name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> SourceKind:
        return self._kind

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def replaced(self) -> int:
        """Frames that arrived but were overwritten by a newer one before anyone took them."""
        with self._condition:
            return self._arrived - self._taken - (1 if self._latest is not None else 0)

    def __iter__(self) -> Iterator[SourceFrame]:
        if self._closed.is_set():
            raise SourceError(f"{self._name} is closed")
        index = 0
        first: float | None = None
        while not self._closed.is_set() and (taken := self._take()) is not None:
            pixels, arrived = taken
            first = arrived if first is None else first
            yield SourceFrame(index=index, pixels=pixels, timestamp_s=arrived - first, spacing_mm=None)
            index += 1

    def close(self) -> None:
        """Stop the reader thread; it closes the connection itself (within its read timeout)."""
        self._closed.set()
        with self._condition:
            self._condition.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> tuple[RGB8, float] | None:
        deadline = time.monotonic() + self._reconnect.stall_timeout_s
        with self._condition:
            while self._latest is None and not self._closed.is_set() and not self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = self._error or "no frame arrived"
                    raise SourceError(
                        f"{self._name}: no frame for {self._reconnect.stall_timeout_s:g} s; last error: {reason}"
                    )
                self._condition.wait(remaining)
            if self._latest is None and self._ended:
                return None
            if self._latest is None:
                raise SourceError(f"{self._name} is closed")
            latest, self._latest = self._latest, None
            self._taken += 1
            return latest

    def _run(self, reader: FrameReader | None) -> None:
        backoff = self._reconnect.backoff_s
        while not self._closed.is_set():
            if reader is None:
                # Every try waits: a stream that opens and drops at once is retried at the backoff's pace.
                if self._closed.wait(backoff):
                    break
                backoff = min(backoff * 2, self._reconnect.max_backoff_s)
                try:
                    reader = self._open_reader()
                except EdgescopeError as exc:
                    self._fail(SourceError(str(exc)))
                    continue
                self.reconnects += 1
                logger.info("%s: reconnected", self._name)
            opened = time.monotonic()
            try:
                ended = self._pump(reader)
            except SourceError as exc:
                self._fail(exc)
                ended = False
            finally:
                reader.close()
                reader = None
            if ended:
                with self._condition:
                    self._ended = True
                    self._condition.notify_all()
                logger.info("%s: the stream ended", self._name)
                return
            if time.monotonic() - opened >= self._reconnect.max_backoff_s:
                backoff = self._reconnect.backoff_s

    def _pump(self, reader: FrameReader) -> bool:
        """Deliver frames until closed (False) or until a finite stream ends and is not looped (True)."""
        while not self._closed.is_set():
            pixels = reader.read()
            if pixels is None:
                if reader.finite and not self._loop:
                    return True
                raise SourceError("the stream ended")
            with self._condition:
                self._latest = (pixels, time.monotonic())
                self._arrived += 1
                self._error = None
                self._condition.notify_all()
        return False

    def _fail(self, error: SourceError) -> None:
        with self._condition:
            if self._error is None or str(self._error) != str(error):
                logger.warning("%s: %s; reconnecting", self._name, error)
            self._error = error
