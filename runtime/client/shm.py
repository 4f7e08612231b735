"""The client's side of shared-memory frames: a ring of slots registered once.

See ``edgescope.runtime.server.shm`` for how the server maps it. The client
creates and unlinks the segment; it rewrites a slot only after the answer to
the frame in it has arrived.
"""

from __future__ import annotations

import asyncio
from multiprocessing import shared_memory

import grpc
import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.layout import raw_layout
from edgescope.v1 import stream_pb2, stream_pb2_grpc


class SharedMemorySender:
    """Client side: a ring of slots registered once; frames refer to their slot.

    The ring is created and registered on the first frame, with slots the size
    of that frame; a later frame that does not fit travels as bytes.
    """

    def __init__(self, stub: stream_pb2_grpc.StreamServiceAsyncStub, stream_id: str, slot_count: int = 4) -> None:
        if slot_count < 1:
            raise ValueError("a shared-memory ring needs at least one slot")
        self._stub = stub
        self._stream_id = stream_id
        self._slot_count = slot_count
        self._segment: shared_memory.SharedMemory | None = None
        self._slot_bytes = 0
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self._slot_of: dict[int, int] = {}

    @property
    def region(self) -> str | None:
        return self._segment.name if self._segment is not None else None

    async def _open(self, slot_bytes: int) -> shared_memory.SharedMemory:
        segment = shared_memory.SharedMemory(create=True, size=slot_bytes * self._slot_count)
        self._segment, self._slot_bytes = segment, slot_bytes
        for slot in range(self._slot_count):
            self._free.put_nowait(slot)
        await self._stub.RegisterSharedMemory(
            stream_pb2.RegisterSharedMemoryRequest(
                region=segment.name, slot_count=self._slot_count, slot_bytes=slot_bytes, stream_id=self._stream_id
            )
        )
        return segment

    async def place(self, frame: stream_pb2.Frame, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> None:
        """Put ``pixels`` in a free slot (waiting for one) and point ``frame`` at it."""
        data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
        segment = self._segment or await self._open(data.nbytes)
        if data.nbytes > self._slot_bytes:
            frame.raw.CopyFrom(raw_layout(pixels))
            frame.raw.data = data.tobytes()
            return
        slot = await self._free.get()
        start = slot * self._slot_bytes
        target = np.ndarray(data.shape, dtype=data.dtype, buffer=segment.buf, offset=start)
        target[...] = data
        del target  # no view may outlive the segment
        self._slot_of[frame.seq] = slot
        frame.shm.CopyFrom(
            stream_pb2.SharedMemoryFrame(
                region=segment.name, slot=slot, offset=0, size=data.nbytes, image=raw_layout(pixels)
            )
        )

    def answered(self, seq: int) -> None:
        """The answer to frame ``seq`` arrived: its slot may be written again."""
        slot = self._slot_of.pop(seq, None)
        if slot is not None:
            self._free.put_nowait(slot)

    async def unregister(self) -> None:
        """Tell the server to unmap the ring (it also does when the stream ends)."""
        if self._segment is None:
            return
        try:
            await self._stub.UnregisterSharedMemory(stream_pb2.UnregisterSharedMemoryRequest(region=self._segment.name))
        except grpc.aio.AioRpcError as exc:
            # The server already unmapped it when the stream ended.
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise

    def unlink(self) -> None:
        """Free the ring; the client owns it, so only the client removes it."""
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
            segment.unlink()
