"""How many unary calls of one client run at once; the rest wait their turn, then are refused.

A client firing a hundred calls at once should get its share of the model,
not a hundred refusals a second to retry: that churn alone took most of a
2-core machine's CPU from the live streams beside it. So each client (see
``auth.current_client``) has ``running`` calls at the model's queue at once;
further calls wait here, costing nothing but their request's memory, and past
``waiting`` more they are refused at once with ``OverloadError``
(RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from edgescope.errors import OverloadError

RUNNING_PER_CLIENT = 16
WAITING_PER_CLIENT = 256


@dataclass(slots=True)
class _Client:
    running: asyncio.Semaphore
    waiting: int = 0
    # Calls of this client inside ``turn``, running or waiting: at 0 it is forgotten.
    inside: int = 0


class Admission:
    """Per-client limits on unary calls; use ``async with admission.turn(client):`` around a call's work."""

    def __init__(self, running: int = RUNNING_PER_CLIENT, waiting: int = WAITING_PER_CLIENT) -> None:
        self._running = running
        self._waiting = waiting
        self._clients: dict[str, _Client] = {}

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
