"""Memory handed back after streams end: cycles collected, free pages trimmed on a thread, one return for
many streams ending at once."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from edgescope.runtime.server.memory import MIN_INTERVAL_S, PASSES, MemoryReturn


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """Only explicit collections run (as when the collector's thresholds are far off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def _returns(memory: MemoryReturn, count: int) -> None:
    """Until ``memory`` has made ``count`` returns (bounded by the caller's timeout)."""
    while memory.returns < count:
        await asyncio.sleep(0.01)


def test_streams_ending_together_cost_one_return_on_a_thread_and_later_ends_another() -> None:
    threads: list[int] = []
    memory = MemoryReturn(lambda: threads.append(threading.get_ident()))

    async def scenario() -> None:
        for _ in range(20):
            memory.stream_ended()
        await _returns(memory, PASSES)
        await asyncio.sleep(0.05)
        assert memory.returns == PASSES
        memory.stream_ended()
        await _returns(memory, 2 * PASSES)

    loop_thread = threading.get_ident()
    asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert memory.returns == 2 * PASSES and len(threads) == 2 * PASSES
    assert loop_thread not in threads


class _Held:
    """Stands for what a cancelled stream leaves: objects that refer to each other, one holding a frame."""

    def __init__(self) -> None:
        self.frame = bytearray(6 * 1024 * 1024)
        self.me = self


@pytest.mark.usefixtures("no_automatic_collection")
def test_a_finished_streams_reference_cycles_are_collected_before_the_trim() -> None:
    held = _Held()
    gone = weakref.ref(held)
    alive_at_trim: list[bool] = []
    memory = MemoryReturn(lambda: alive_at_trim.append(gone() is not None))
    del held
    assert gone() is not None  # a cycle: nothing frees it without a collection

    async def scenario() -> None:
        memory.stream_ended()
        await _returns(memory, PASSES)

    asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert alive_at_trim == [False] * PASSES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_c_library_trim_is_found_and_runs() -> None:
    memory = MemoryReturn()
    assert memory.trims

    async def scenario() -> None:
        memory.stream_ended()
        await _returns(memory, PASSES)

    asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert memory.returns == PASSES


def test_closing_gives_up_the_returns_still_to_come_without_waiting_for_them() -> None:
    memory = MemoryReturn(lambda: None)

    async def scenario() -> float:
        memory.stream_ended()
        await _returns(memory, 1)
        started = time.monotonic()
        await memory.close()
        return time.monotonic() - started

    took = asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert memory.returns == 1 and took < MIN_INTERVAL_S / 2
