"""Whether a stream keeps up with its source: a warning when the achieved rate stays under 90%.

Results are counted over consecutive windows (5 s by default). When the rate
of answered frames stays below ``threshold`` of the source's rate for
``windows`` windows in a row, one warning says so, with both rates; it is
said again only after the rate has recovered. A stream sent as fast as
possible has no source rate to keep and is not watched.
"""

from __future__ import annotations

import logging

__all__ = ["RateWatch"]

logger = logging.getLogger("edgescope.runtime.client.stream")


class RateWatch:
    def __init__(self, source_fps: float, *, threshold: float = 0.9, window_s: float = 5.0, windows: int = 2) -> None:
        self.source_fps = source_fps
        self._threshold = threshold
        self._window_s = window_s
        self._windows = windows
        self._start: float | None = None
        self._count = 0
        self._low = 0
        self._warned = False
        self.warnings: list[str] = []

    def answered(self, now: float) -> None:
        """One frame answered at ``now`` (monotonic seconds)."""
        if self._start is None:
            self._start = now  # the clock starts at the first answer: connecting is not streaming
            return
        self._count += 1
        elapsed = now - self._start
        if elapsed < self._window_s:
            return
        rate = self._count / elapsed
        self._start, self._count = now, 0
        if rate >= self._threshold * self.source_fps:
            self._low, self._warned = 0, False
            return
        self._low += 1
        if self._low >= self._windows and not self._warned:
            self._warned = True
            message = (
                f"achieved {rate:.1f} fps, under {self._threshold:.0%} of the source's {self.source_fps:.1f} fps "
                f"for {self._low * self._window_s:.0f} s: the source, the network or the server cannot keep up"
            )
            self.warnings.append(message)
            logger.warning(message)
