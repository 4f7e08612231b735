"""INT8 entropy calibration for TensorRT 10 (TensorRT 11 removed calibrators).

The calibrator feeds preprocessed frames to the builder in batches of the
profile's opt batch and keeps TensorRT's calibration cache in a file, so a
rebuild on the same TensorRT skips calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgescope.engines import cuda_runtime
from edgescope.errors import ExportError

TRT10_ONLY = frozenset(
    {"IInt8EntropyCalibrator2", "get_batch", "get_batch_size", "read_calibration_cache", "write_calibration_cache"}
)
"""TensorRT names used here that exist in TensorRT 10 only (checked by tests/test_tensorrt_api.py)."""


def _check(error: Any, what: str) -> None:
    cudart = cuda_runtime()
    if error != cudart.cudaError_t.cudaSuccess:
        raise ExportError(f"{what} failed during INT8 calibration: {error}")


def entropy_calibrator(frames: Sequence[npt.NDArray[np.float32]], batch: int, cache: Path) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` over ``frames`` (each ``(1, C, H, W)``) that caches to ``cache``."""
    import tensorrt

    # TensorRT 11 has no calibrators and this module runs on 10 only; untyped, it is checkable against 11 too.
    trt_10: Any = tensorrt
    cudart = cuda_runtime()
    batches = [
        np.ascontiguousarray(np.concatenate(frames[i : i + batch]), dtype=np.float32)
        for i in range(0, len(frames) - batch + 1, batch)
    ]
    if not batches:
        raise ExportError(f"INT8 calibration needs at least {batch} frames (the profile's opt batch)")

    class EntropyCalibrator(trt_10.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt_10.IInt8EntropyCalibrator2.__init__(self)
            self._pending = iter(batches)
            error, self._device = cudart.cudaMalloc(batches[0].nbytes)
            _check(error, "cudaMalloc")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str], p_str: object = None) -> list[int] | None:
            host = next(self._pending, None)
            if host is None:
                cudart.cudaFree(self._device)
                return None
            (error,) = cudart.cudaMemcpy(
                self._device, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            )
            _check(error, "cudaMemcpy")
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()
