"""How many unary calls of one client run at once (the rest wait their turn, then are refused), and how many
streams it may hold open.

A client firing a hundred calls at once should get its share of the model,
not a hundred refusals a second to retry: that churn alone took most of a
2-core machine's CPU from the live streams beside it. So each client (see
``auth.current_client``) has ``running`` calls at the model's queue at once;
further calls wait here, costing nothing but their request's memory, and past
``waiting`` more they are refused at once with ``OverloadError``
(RESOURCE_EXHAUSTED). A client's streams are each bounded (a window of frames),
but not their number: past ``STREAMS_PER_CLIENT`` open at once, a new one is
refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from edgescope.errors import OverloadError

RUNNING_PER_CLIENT = 16
WAITING_PER_CLIENT = 256
# Each holds up to 6 frames (36 MB at 1080p): room for every source of a busy device, not for a flood.
STREAMS_PER_CLIENT = 64


@dataclass(slots=True)
class _Client:
    running: asyncio.Semaphore
    waiting: int = 0
    # Calls of this client inside ``turn``, running or waiting: at 0 it is forgotten.
    inside: int = 0


class Admission:
    """Per-client limits on unary calls; use ``async with admission.turn(client):`` around a call's work."""

    def __init__(
        self, running: int = RUNNING_PER_CLIENT, waiting: int = WAITING_PER_CLIENT, streams: int = STREAMS_PER_CLIENT
    ) -> None:
        self._running = running
        self._waiting = waiting
        self._clients: dict[str, _Client] = {}
        self._max_streams = streams
        self._streams: dict[str, int] = {}

    def open_stream(self, client: str) -> str | None:
        """Take one of the client's stream places; if it has none left, why not (and nothing is taken)."""
        held = self._streams.get(client, 0)
        if held >= self._max_streams:
            return f"this client has {held} streams open, the most it may; close one before opening another"
        self._streams[client] = held + 1
        return None

    def close_stream(self, client: str) -> None:
        held = self._streams.pop(client) - 1
        if held:
            self._streams[client] = held

    @asynccontextmanager
    async def turn(self, client: str) -> AsyncIterator[None]:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(asyncio.Semaphore(self._running))
        if state.running.locked() and state.waiting >= self._waiting:
            raise OverloadError(
                f"this client has {self._running} calls running and {state.waiting} waiting; "
                "wait for their answers before sending more"
            )
        state.inside += 1
        try:
            state.waiting += 1
            try:
                await state.running.acquire()
            finally:
                state.waiting -= 1
            try:
                yield
            finally:
                state.running.release()
        finally:
            state.inside -= 1
            if state.inside == 0:
                # A client that has gone quiet holds nothing here.
                del self._clients[client]
