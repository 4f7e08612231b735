"""Freed frame memory goes back to the system when a stream ends.

glibc keeps what the server frees in its heaps: past the first few, large
blocks such as 6 MB 1080p frames are no longer unmapped when freed but kept
for reuse, so the server's resident memory stays at the peak that a few
streams of big frames raised, long after they have gone. ``malloc_trim``
hands the free pages back; it runs on a thread (it walks every heap), at most
once a second, after streams end. On a C library without it, nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable

# At most one trim in this many seconds: many streams ending at once cost one.
MIN_INTERVAL_S = 1.0


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
    """Call ``stream_ended`` from the event loop; the trim follows on a thread."""

    def __init__(self, trim: Callable[[], object] | None = None) -> None:
        self._trim = trim if trim is not None else _malloc_trim()
        self._last = 0.0
        self._pending: asyncio.Task[None] | None = None
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def stream_ended(self) -> None:
        if self._trim is None or (self._pending is not None and not self._pending.done()):
            return
        self._pending = asyncio.get_running_loop().create_task(self._run(self._trim))

    async def _run(self, trim: Callable[[], object]) -> None:
        await asyncio.sleep(max(0.0, self._last + MIN_INTERVAL_S - time.monotonic()))
        await asyncio.to_thread(trim)
        self._last = time.monotonic()
        self.trims += 1

    async def close(self) -> None:
        """Wait for a trim under way (so none outlives the server's loop)."""
        if self._pending is not None:
            await self._pending
