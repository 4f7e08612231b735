"""Memory handed back after streams end: cycles collected, free pages trimmed on a thread, one return for
many streams ending at once."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import weakref
from collections.abc import Iterator

import pytest

from edgescope.runtime.server.memory import MIN_INTERVAL_S, MemoryReturn


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


def test_streams_ending_together_cost_one_trim_on_a_thread_and_later_ends_another() -> None:
    threads: list[int] = []
    memory = MemoryReturn(lambda: threads.append(threading.get_ident()))

    async def scenario() -> None:
        for _ in range(20):
            memory.stream_ended()
        await memory.close()
        assert memory.returns == 1
        memory.stream_ended()
        await memory.close()

    loop_thread = threading.get_ident()
    asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert memory.returns == 2 and len(threads) == 2
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
        await memory.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert alive_at_trim == [False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_c_library_trim_is_found_and_runs() -> None:
    memory = MemoryReturn()
    assert memory.trims

    async def scenario() -> None:
        memory.stream_ended()
        await memory.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert memory.returns == 1
