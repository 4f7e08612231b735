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

Ownership: a region belongs to the caller that registered it (its credential
on its connection, ``auth.Caller.owner``). Only that caller's frames may read
it and only that caller may unregister it; a stream's end releases only the
regions its own caller registered for it. One caller may hold
``MAX_REGIONS_PER_CALLER`` regions, and the server ``MAX_REGIONS`` in all.
Names are POSIX shared-memory names of portable characters, never a path.

Here: ``REGIONS`` (the mappings of this process) and ``SharedMemoryServicer``
(the two unary calls, mixed into the stream service). The client's side is
``edgescope.runtime.client.shm``.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]  # CPython's POSIX shm binding, untyped
import contextlib
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from edgescope.errors import EdgescopeError, FrameError, PermissionDeniedError, QuotaExceededError
from edgescope.runtime.server.auth import current_caller
from edgescope.runtime.server.grpc_status import echo, status_code_for
from edgescope.v1 import stream_pb2

# Bounds what clients can make the server map: in all, per caller, per region.
MAX_REGIONS = 64
MAX_REGIONS_PER_CALLER = 4
MAX_REGION_BYTES = 8 * 1024**3
# POSIX shared-memory names (as multiprocessing.shared_memory makes them): one
# component of portable characters, not starting with a dot, NAME_MAX at most.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}")


def _owner() -> str:
    """Who owns what is registered now: the current call's caller; empty for in-process use."""
    caller = current_caller()
    return caller.owner if caller is not None else ""


@dataclass(frozen=True, slots=True)
class _Region:
    name: str
    slot_count: int
    slot_bytes: int
    stream_id: str
    mapping: mmap.mmap
    owner: str


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
    except OSError as exc:
        raise FrameError(f"shared-memory region {name!r} cannot be opened: {exc.strerror}") from exc
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise FrameError(f"shared-memory region {name!r} is {actual} bytes; its slots need {size}")
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except OSError as exc:  # not mappable (a size the kernel refuses, out of address space)
        raise FrameError(f"shared-memory region {name!r} cannot be mapped: {exc.strerror}") from exc
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
        if not _NAME.fullmatch(name):
            raise FrameError(f"{echo(name)} is not a shared-memory region name (letters, digits, _ . -)")
        if slot_count == 0 or slot_bytes == 0:
            raise FrameError(f"region {echo(name)}: slot_count and slot_bytes must be positive")
        size = slot_count * slot_bytes
        if size > MAX_REGION_BYTES:
            raise FrameError(f"region {echo(name)}: {size} bytes is more than the {MAX_REGION_BYTES} allowed")
        owner = _owner()
        self._check_room(name, owner)
        mapping = _map_read_only(name, size)
        with self._lock:
            try:
                self._check_room(name, owner)
            except EdgescopeError:
                _unmap(mapping)
                raise
            self._regions[name] = _Region(name, slot_count, slot_bytes, stream_id, mapping, owner)

    def _check_room(self, name: str, owner: str) -> None:
        # Called with and without the lock held: the second call makes the check and the insert atomic.
        if name in self._regions:
            raise FrameError(f"shared-memory region {echo(name)} is already registered")
        if len(self._regions) >= MAX_REGIONS:
            raise QuotaExceededError(
                f"{MAX_REGIONS} shared-memory regions are registered already; unregister one first"
            )
        if sum(1 for r in self._regions.values() if r.owner == owner) >= MAX_REGIONS_PER_CALLER:
            raise QuotaExceededError(
                f"this caller holds {MAX_REGIONS_PER_CALLER} shared-memory regions, the most one caller may"
            )

    def _owned(self, name: str) -> _Region:
        """The region of that name if the current caller registered it (call with the lock held)."""
        region = self._regions.get(name)
        if region is None:
            raise FrameError(f"shared-memory region {echo(name)} is not registered (RegisterSharedMemory first)")
        if region.owner != _owner():
            raise PermissionDeniedError(
                f"shared-memory region {echo(name)} was registered by another caller; "
                "only its registrant (same credential, same connection) may use it"
            )
        return region

    def unregister(self, name: str) -> None:
        with self._lock:
            region = self._owned(name)
            del self._regions[name]
        _unmap(region.mapping)

    def release_stream(self, stream_id: str) -> None:
        """Unmap the regions the current caller registered for a stream that has ended."""
        if not stream_id:
            return
        owner = _owner()
        with self._lock:
            ended = [r for r in self._regions.values() if r.stream_id == stream_id and r.owner == owner]
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
            region = self._owned(ref.region)
        if ref.slot >= region.slot_count:
            raise FrameError(
                f"slot {ref.slot} is outside region {echo(ref.region)}, which has {region.slot_count} slots"
            )
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
            raise FrameError(f"shared-memory region {echo(ref.region)} was unregistered") from exc

    def close(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            _unmap(region.mapping)


# Mappings belong to the process: frame decoding, wherever it runs, reads from here.
REGIONS = SharedMemoryRegistry()


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
