"""Frames through POSIX shared memory instead of protobuf bytes (same host only).

A 1080p RGB frame is 6 MB; sent as protobuf bytes it is copied into the
message, through the socket and out of it again. A same-host client instead
creates one shared-memory segment holding a ring of equal slots, registers it
once (``RegisterSharedMemory``), writes each frame into a free slot and sends
only where it lies (``Frame.shm``: region, slot, offset, size, layout). The
server maps the segment read-only and decodes the pixels in place.

Ownership: the client creates and unlinks the segment; the server only maps
and unmaps it. A slot is not rewritten until the answer to the frame in it has
arrived, so the server never reads a slot that is being written. A frame that
is still being processed when its region is unregistered keeps the mapping
alive through its own view; the memory is unmapped when that view is gone.

Server side: ``REGIONS`` (the mappings of this process) and
``SharedMemoryServicer`` (the two unary calls, mixed into the stream service).
Client side: ``SharedMemorySender``.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]  # CPython's POSIX shm binding, untyped
import asyncio
import contextlib
import mmap
import os
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from edgescope.errors import EdgescopeError, FrameError
from edgescope.runtime.pipeline.layout import raw_layout
from edgescope.runtime.status import status_code_for
from edgescope.v1 import stream_pb2, stream_pb2_grpc

# Bounds what one client can make the server map.
MAX_REGIONS = 64
MAX_REGION_BYTES = 8 * 1024**3
# POSIX shared-memory names: one path component, NAME_MAX long at most.
_MAX_NAME = 250


@dataclass(frozen=True, slots=True)
class _Region:
    name: str
    slot_count: int
    slot_bytes: int
    stream_id: str
    mapping: mmap.mmap


def _map_read_only(name: str, size: int) -> mmap.mmap:
    # Not SharedMemory(name): before Python 3.13 attaching registers the segment
    # with this process's resource tracker, which unlinks it at exit, under the
    # client that owns it.
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0)
    except FileNotFoundError as exc:
        raise FrameError(
            f"shared-memory region {name!r} does not exist on the server's host; "
            "shared-memory frames need the client and the server on the same host"
        ) from exc
    except PermissionError as exc:
        raise FrameError(f"the server may not read shared-memory region {name!r}: {exc}") from exc
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise FrameError(f"shared-memory region {name!r} is {actual} bytes; its slots need {size}")
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _unmap(mapping: mmap.mmap) -> None:
    # BufferError: a frame still reads from it; it is unmapped when that frame's view goes.
    with contextlib.suppress(BufferError):
        mapping.close()


class SharedMemoryRegistry:
    """The client regions mapped into this process, by name; thread-safe."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, slot_count: int, slot_bytes: int, stream_id: str = "") -> None:
        if not name or "/" in name or len(name) > _MAX_NAME or "\0" in name:
            raise FrameError(f"{name!r} is not a shared-memory region name")
        if slot_count == 0 or slot_bytes == 0:
            raise FrameError(f"region {name!r}: slot_count and slot_bytes must be positive")
        size = slot_count * slot_bytes
        if size > MAX_REGION_BYTES:
            raise FrameError(f"region {name!r}: {size} bytes is more than the {MAX_REGION_BYTES} allowed")
        with self._lock:
            if name in self._regions:
                raise FrameError(f"shared-memory region {name!r} is already registered")
            if len(self._regions) >= MAX_REGIONS:
                raise FrameError(f"{MAX_REGIONS} shared-memory regions are registered already; unregister one first")
        mapping = _map_read_only(name, size)
        with self._lock:
            if name in self._regions:
                _unmap(mapping)
                raise FrameError(f"shared-memory region {name!r} is already registered")
            self._regions[name] = _Region(name, slot_count, slot_bytes, stream_id, mapping)

    def unregister(self, name: str) -> None:
        with self._lock:
            region = self._regions.pop(name, None)
        if region is None:
            raise FrameError(f"shared-memory region {name!r} is not registered")
        _unmap(region.mapping)

    def release_stream(self, stream_id: str) -> None:
        """Unmap the regions registered for a stream that has ended."""
        if not stream_id:
            return
        with self._lock:
            ended = [r for r in self._regions.values() if r.stream_id == stream_id]
            for region in ended:
                del self._regions[region.name]
        for region in ended:
            _unmap(region.mapping)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._regions)

    def view(self, ref: stream_pb2.SharedMemoryFrame) -> memoryview:
        """The ``size`` bytes a frame refers to, read-only, bounds-checked."""
        with self._lock:
            region = self._regions.get(ref.region)
        if region is None:
            raise FrameError(f"shared-memory region {ref.region!r} is not registered (RegisterSharedMemory first)")
        if ref.slot >= region.slot_count:
            raise FrameError(f"slot {ref.slot} is outside region {ref.region!r}, which has {region.slot_count} slots")
        if ref.size == 0:
            raise FrameError("shared-memory frame size is 0")
        if ref.offset + ref.size > region.slot_bytes:
            raise FrameError(
                f"offset {ref.offset} + size {ref.size} runs past the end of a {region.slot_bytes}-byte slot"
            )
        start = ref.slot * region.slot_bytes + ref.offset
        try:
            return memoryview(region.mapping)[start : start + ref.size]
        except ValueError as exc:  # unmapped by a concurrent unregister
            raise FrameError(f"shared-memory region {ref.region!r} was unregistered") from exc

    def close(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            _unmap(region.mapping)


# Mappings belong to the process: frame decoding, wherever it runs, reads from here.
REGIONS = SharedMemoryRegistry()


def shared_memory_view(ref: stream_pb2.SharedMemoryFrame) -> memoryview:
    return REGIONS.view(ref)


class SharedMemoryServicer:
    """RegisterSharedMemory / UnregisterSharedMemory, mixed into the stream servicer."""

    async def RegisterSharedMemory(
        self,
        request: stream_pb2.RegisterSharedMemoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> stream_pb2.RegisterSharedMemoryResponse:
        try:
            # Mapping is a system call or two; it does not block the loop for long.
            REGIONS.register(request.region, request.slot_count, request.slot_bytes, request.stream_id)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        return stream_pb2.RegisterSharedMemoryResponse()

    async def UnregisterSharedMemory(
        self,
        request: stream_pb2.UnregisterSharedMemoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> stream_pb2.UnregisterSharedMemoryResponse:
        try:
            REGIONS.unregister(request.region)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        return stream_pb2.UnregisterSharedMemoryResponse()


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
