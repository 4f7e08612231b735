"""Freed frame memory goes back to the system when a stream ends.

Two things keep a finished stream's frames in the server's memory. A stream
that ends by cancellation leaves reference cycles behind (its cancelled
tasks, their exceptions and suspended frames) that hold the frames it was
working on until the collector's next full pass, which may not come for
many streams: each one cancelled kept about 20 MB of 1080p frames alive.
And glibc keeps what the server frees in its heaps: past the first few,
large blocks such as 6 MB 1080p frames are no longer unmapped when freed but
kept for reuse, so the resident memory stays at the peak long after.

So after streams end (at once, and again a second later; at most once a
second) the cycles are collected, on the event loop, where automatic
collections run too, so finalizers run where they always do (about a
millisecond: the startup objects are frozen), and ``malloc_trim`` hands the
free pages back, on a thread (it walks every heap). On a C library without
it, only the collection is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable

# At most one return in this many seconds: many streams ending at once cost one.
MIN_INTERVAL_S = 1.0
PASSES = 2


def _malloc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class MemoryReturn:
    """Call ``stream_ended`` from the event loop; the collection and the trim follow."""

    def __init__(self, trim: Callable[[], object] | None = None) -> None:
        self._trim = trim if trim is not None else _malloc_trim()
        self._last = 0.0
        self._pending: asyncio.Task[None] | None = None
        self.returns = 0

    @property
    def trims(self) -> bool:
        """Whether free pages are handed back too (glibc), not only cycles collected."""
        return self._trim is not None

    def stream_ended(self) -> None:
        if self._pending is not None and not self._pending.done():
            return
        self._pending = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # Twice: at once, and again once what the stream's last jobs and gRPC's buffers for the call free
        # after it has ended is free too (a second later, about 50 MB for two 1080p streams).
        for _ in range(PASSES):
            await asyncio.sleep(max(0.0, self._last + MIN_INTERVAL_S - time.monotonic()))
            gc.collect()
            if self._trim is not None:
                await asyncio.to_thread(self._trim)
            self._last = time.monotonic()
            self.returns += 1

    async def close(self) -> None:
        """Give up a return still to come (the process is stopping) and wait for one under way."""
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending
