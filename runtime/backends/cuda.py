"""A small CUDA adapter over cuda-python's runtime API (cudart).

Just what an engine runner needs: device buffers, pinned (page-locked) host
buffers that asynchronous copies require, copies and execution ordered on one
dedicated non-blocking stream, and CUDA graph capture for static shapes.
Every cudart call returns an error code first; ``_check`` turns a failure
into a BackendError that names the call. cuda-python is imported when the
adapter is built, never with this module.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from edgescope.engines import cuda_runtime
from edgescope.errors import BackendError


class CudaAdapter:
    """One device and one stream; owns what it allocates until ``close``."""

    def __init__(self, device: int = 0) -> None:
        self._rt: Any = cuda_runtime()
        self.device = device
        self._check("cudaSetDevice", self._rt.cudaSetDevice(device))
        self.stream: int = int(
            self._check("cudaStreamCreateWithFlags", self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking))
        )
        self._device_ptrs: set[int] = set()
        self._host_ptrs: set[int] = set()
        self._graphs: list[tuple[Any, Any]] = []

    def _check(self, call: str, result: Any) -> Any:
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(error)
            message = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
            raise BackendError(f"CUDA {call} failed on device {self.device}: {message} ({error})")
        return values[0] if len(values) == 1 else tuple(values)

    def device_buffer(self, nbytes: int) -> int:
        """Device memory of ``nbytes``; returns its address."""
        pointer = int(self._check("cudaMalloc", self._rt.cudaMalloc(max(nbytes, 1))))
        self._device_ptrs.add(pointer)
        return pointer

    def pinned_array(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        """A numpy array in page-locked host memory, so copies can be asynchronous."""
        itemsize = np.dtype(dtype).itemsize
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * itemsize, 1)
        pointer = int(self._check("cudaMallocHost", self._rt.cudaMallocHost(nbytes)))
        self._host_ptrs.add(pointer)
        raw = memoryview((ctypes.c_byte * nbytes).from_address(pointer)).cast("B")
        array: npt.NDArray[Any] = np.frombuffer(raw, dtype=np.dtype(dtype), count=nbytes // itemsize)
        return array.reshape(shape)

    def free_device(self, pointer: int) -> None:
        if pointer in self._device_ptrs:
            self._device_ptrs.discard(pointer)
            self._check("cudaFree", self._rt.cudaFree(pointer))

    def free_pinned(self, array: npt.NDArray[Any]) -> None:
        pointer = int(array.ctypes.data)
        if pointer in self._host_ptrs:
            self._host_ptrs.discard(pointer)
            self._check("cudaFreeHost", self._rt.cudaFreeHost(pointer))

    def to_device(self, device_ptr: int, host: npt.NDArray[Any]) -> None:
        """Queue a host-to-device copy on the stream (``host`` should be pinned)."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            "cudaMemcpyAsync", self._rt.cudaMemcpyAsync(device_ptr, host.ctypes.data, host.nbytes, kind, self.stream)
        )

    def to_host(self, host: npt.NDArray[Any], device_ptr: int) -> None:
        """Queue a device-to-host copy on the stream (``host`` should be pinned)."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            "cudaMemcpyAsync", self._rt.cudaMemcpyAsync(host.ctypes.data, device_ptr, host.nbytes, kind, self.stream)
        )

    def synchronize(self) -> None:
        self._check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self.stream))

    def capture_graph(self, work: Callable[[int], None]) -> Any:
        """Record what ``work(stream)`` queues into a CUDA graph; returns the executable graph.

        Only for fixed shapes and addresses: a replay repeats exactly the
        captured kernels and copies, which saves their launch cost per frame.
        """
        mode = self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check("cudaStreamBeginCapture", self._rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            work(self.stream)
        finally:
            graph = self._check("cudaStreamEndCapture", self._rt.cudaStreamEndCapture(self.stream))
        executable = self._check("cudaGraphInstantiate", self._rt.cudaGraphInstantiate(graph, 0))
        self._graphs.append((graph, executable))
        return executable

    def launch_graph(self, executable: Any) -> None:
        self._check("cudaGraphLaunch", self._rt.cudaGraphLaunch(executable, self.stream))

    def close(self) -> None:
        """Wait for queued work, then free every graph, buffer and the stream."""
        self.synchronize()
        for graph, executable in self._graphs:
            self._check("cudaGraphExecDestroy", self._rt.cudaGraphExecDestroy(executable))
            self._check("cudaGraphDestroy", self._rt.cudaGraphDestroy(graph))
        self._graphs.clear()
        for pointer in list(self._device_ptrs):
            self.free_device(pointer)
        for pointer in list(self._host_ptrs):
            self._host_ptrs.discard(pointer)
            self._check("cudaFreeHost", self._rt.cudaFreeHost(pointer))
        self._check("cudaStreamDestroy", self._rt.cudaStreamDestroy(self.stream))
