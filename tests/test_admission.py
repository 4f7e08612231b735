"""A client's unary calls: a few run at once, more wait their turn, and past that they are refused."""

from __future__ import annotations

import asyncio

import pytest

from edgescope.errors import OverloadError
from edgescope.runtime.server.admission import Admission


def test_calls_beyond_the_running_limit_wait_and_beyond_the_waiting_limit_are_refused() -> None:
    async def scenario() -> tuple[list[str], int]:
        admission = Admission(running=2, waiting=1)
        release = asyncio.Event()
        order: list[str] = []

        async def call(name: str, client: str = "a") -> None:
            async with admission.turn(client):
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(call(name)) for name in ("1", "2", "3")]
        await asyncio.sleep(0.01)
        assert order == ["1", "2"]  # the third waits
        with pytest.raises(OverloadError, match="2 calls running and 1 waiting"):
            await call("4")
        # Another client is not held up by the first one's calls.
        async with admission.turn("b"):
            order.append("b")
        release.set()
        await asyncio.gather(*tasks)
        return order, len(admission._clients)

    order, clients = asyncio.run(scenario())
    assert order == ["1", "2", "b", "3"]
    assert clients == 0  # quiet clients are forgotten


def test_a_call_cancelled_while_waiting_gives_its_place_back() -> None:
    async def scenario() -> int:
        admission = Admission(running=1, waiting=1)
        release = asyncio.Event()

        async def call() -> None:
            async with admission.turn("a"):
                await release.wait()

        running = asyncio.create_task(call())
        waiting = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        # Its waiting place is free again: another call may wait.
        another = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(running, another)
        return len(admission._clients)

    assert asyncio.run(scenario()) == 0


def test_a_clients_streams_beyond_its_places_are_refused_and_a_closed_one_frees_its_place() -> None:
    admission = Admission(streams=2)
    assert admission.open_stream("a") is None and admission.open_stream("a") is None
    refusal = admission.open_stream("a")
    assert refusal is not None and "2 streams open" in refusal
    assert admission.open_stream("b") is None  # another client has places of its own
    admission.close_stream("a")
    assert admission.open_stream("a") is None
