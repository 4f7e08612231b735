"""Freed memory handed back after streams end: one trim for many streams ending at once, never on the loop."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from edgescope.runtime.server.memory import MIN_INTERVAL_S, MemoryReturn


def test_streams_ending_together_cost_one_trim_on_a_thread_and_later_ends_another() -> None:
    threads: list[int] = []
    memory = MemoryReturn(lambda: threads.append(threading.get_ident()))

    async def scenario() -> None:
        for _ in range(20):
            memory.stream_ended()
        await memory.close()
        assert memory.trims == 1
        memory.stream_ended()
        await memory.close()

    loop_thread = threading.get_ident()
    asyncio.run(asyncio.wait_for(scenario(), 10 * MIN_INTERVAL_S))
    assert memory.trims == 2 and len(threads) == 2
    assert loop_thread not in threads


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_c_library_trim_is_found_and_runs() -> None:
    memory = MemoryReturn()
    assert memory.available

    async def scenario() -> None:
        memory.stream_ended()
        await memory.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert memory.trims == 1
