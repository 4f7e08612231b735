"""TensorRT engine runner (TensorRT 10/11 tensor API) on the CUDA adapter.

The engine is the plan under the bundle's ``engines/`` that was built for
this GPU and this TensorRT (``edgescope.engines.select_engine``); it is never
built here. Per frame: copy the input into pinned host memory, queue the
host-to-device copy, ``execute_async_v3`` and the device-to-host copies on
the session's own stream, then wait once. Buffers are kept between frames
and grown only when a larger shape arrives. With ``cuda_graph`` and a
static-shape engine, the enqueued work is captured once and replayed.

One engine per plan and device, as Triton keeps: a backend's sessions of
one model (its instances) share the deserialised engine, and so one copy of
its weights on the GPU; each session has its own execution context, stream
and buffers. The engine goes when its last session closes. A session takes
at most the engine profile's largest batch in one inference
(``SessionCapabilities.max_batch``), which the model's worker and KServe
respect.

tensorrt and cuda-python are imported when a backend or session is built,
never with this module.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgescope.bundle import Bundle
from edgescope.engines import PRECISION_NAMES, TENSORRT_HINT, device_facts, read_sidecar, select_engine
from edgescope.errors import BackendError, BundleError, FrameError, MissingDependencyError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.backends.cuda import CudaAdapter
from edgescope.v1 import manifest_pb2


def _require_tensorrt() -> None:
    """MissingDependencyError when tensorrt does not import; callers then import it as ``trt``, which mypy types."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("TensorRT", TENSORRT_HINT) from exc


@dataclass(slots=True)
class _Tensor:
    """One engine input or output and its buffers (grown on demand)."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    shape: tuple[int, ...] = ()
    capacity: int = 0
    device: int = 0
    host: npt.NDArray[Any] = field(default_factory=lambda: np.empty(0))


class _Engine:
    """A deserialised engine and the runtime that owns it, shared by the sessions that hold it."""

    def __init__(self, plan: bytes, name: str) -> None:
        _require_tensorrt()
        import tensorrt as trt

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {name} (built for another GPU or TensorRT?)")
        self.engine = engine
        self.users = 0

    def close(self) -> None:
        # The engine before the runtime that deserialised it.
        del self.engine
        del self.runtime


class EngineCache:
    """Engines by (plan sha256, device); each deserialised once, freed when its last session lets go."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, int], _Engine] = {}
        self._lock = threading.Lock()

    def acquire(self, plan: bytes, sha256: str, device: int, name: str) -> _Engine:
        with self._lock:
            engine = self._engines.get((sha256, device))
            if engine is None:
                engine = self._engines[(sha256, device)] = _Engine(plan, name)
            engine.users += 1
            return engine

    def release(self, engine: _Engine) -> None:
        with self._lock:
            engine.users -= 1
            if engine.users == 0:
                self._engines = {key: held for key, held in self._engines.items() if held is not engine}
                engine.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)


class TensorRTSession(Session):
    backend_name = "tensorrt"

    def __init__(
        self,
        manifest: manifest_pb2.ModelManifest,
        plan: bytes,
        entry: manifest_pb2.EngineEntry,
        *,
        device: int = 0,
        cuda_graph: bool = False,
        engines: EngineCache | None = None,
    ) -> None:
        super().__init__(manifest)
        sha256 = hashlib.sha256(plan).hexdigest()
        self._info = tensorrt_info(entry, sha256, device)
        _require_tensorrt()
        import tensorrt as trt

        # The device is made current on this thread before the engine is touched.
        self._cuda = CudaAdapter(device)
        self._cache = engines if engines is not None else EngineCache()
        try:
            self._shared = self._cache.acquire(plan, sha256, device, entry.plan)
        except BaseException:
            self._cuda.close()
            raise
        self._engine = self._shared.engine
        try:
            context = self._engine.create_execution_context()
            if context is None:
                raise BackendError(f"TensorRT could not create an execution context for {entry.plan}")
            self._context = context
        except BaseException:
            self._cache.release(self._shared)
            self._cuda.close()
            raise
        self._plan = Path(entry.plan)
        self._device = device
        self._tensors: dict[str, _Tensor] = {}
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            self._tensors[name] = _Tensor(name, is_input, dtype)
        self._static = all(-1 not in tuple(self._engine.get_tensor_shape(n)) for n in self._tensors)
        self._max_batch = None if self._static or entry.max_batch == 0 else int(entry.max_batch)
        self._use_graph = cuda_graph and self._static
        self._graph: Any = None

    @property
    def capabilities(self) -> SessionCapabilities:
        # One execution context, one stream, one set of buffers: one caller at a time.
        return SessionCapabilities(
            dynamic_batch=not self._static,
            device_buffers=True,
            device=f"cuda:{self._device}",
            max_concurrency=1,
            max_batch=self._max_batch,
        )

    def _ensure(self, tensor: _Tensor, shape: tuple[int, ...]) -> bool:
        """Size the tensor's buffers for ``shape``; True when an address changed."""
        tensor.shape = shape
        nbytes = int(np.prod(shape, dtype=np.int64)) * tensor.dtype.itemsize
        if nbytes <= tensor.capacity:
            return False
        if tensor.capacity:
            self._cuda.free_pinned(tensor.host)
            self._cuda.free_device(tensor.device)
        tensor.capacity = nbytes
        tensor.device = self._cuda.device_buffer(nbytes)
        tensor.host = self._cuda.pinned_array((nbytes // tensor.dtype.itemsize,), tensor.dtype)
        self._context.set_tensor_address(tensor.name, tensor.device)
        return True

    def _host_view(self, tensor: _Tensor) -> npt.NDArray[Any]:
        return tensor.host[: int(np.prod(tensor.shape, dtype=np.int64))].reshape(tensor.shape)

    def _enqueue(self, stream: int) -> None:
        for tensor in self._tensors.values():
            if tensor.is_input:
                self._cuda.to_device(tensor.device, self._host_view(tensor))
        if not self._context.execute_async_v3(stream):
            raise BackendError(f"TensorRT execute_async_v3 failed for {self._plan.name}")
        for tensor in self._tensors.values():
            if not tensor.is_input:
                self._cuda.to_host(self._host_view(tensor), tensor.device)

    def _infer_impl(self, feed: Feed) -> Outputs:
        inputs = [t for t in self._tensors.values() if t.is_input]
        if sorted(feed) != sorted(t.name for t in inputs):
            raise FrameError(f"engine {self._plan.name} takes {sorted(t.name for t in inputs)}, got {sorted(feed)}")
        moved = False
        for tensor in inputs:
            array = np.asarray(feed[tensor.name])
            if array.dtype != tensor.dtype:
                raise FrameError(f"engine input {tensor.name!r} is {tensor.dtype}, the feed gives {array.dtype}")
            if array.shape != tensor.shape and not self._context.set_input_shape(tensor.name, array.shape):
                raise FrameError(f"engine input {tensor.name!r} cannot take shape {array.shape} (outside its profile)")
            moved |= self._ensure(tensor, array.shape)
            self._host_view(tensor)[...] = array
        for tensor in self._tensors.values():
            if not tensor.is_input:
                moved |= self._ensure(tensor, tuple(self._context.get_tensor_shape(tensor.name)))
        if self._use_graph:
            if self._graph is None or moved:
                # TensorRT asks for one plain enqueue before capture, to settle deferred set-up.
                self._enqueue(self._cuda.stream)
                self._cuda.synchronize()
                self._graph = self._cuda.capture_graph(self._enqueue)
            self._cuda.launch_graph(self._graph)
        else:
            self._enqueue(self._cuda.stream)
        self._cuda.synchronize()
        return {t.name: self._host_view(t).copy() for t in self._tensors.values() if not t.is_input}

    def describe(self) -> manifest_pb2.RunnerInfo:
        """The engine that runs, with its own precision and the plan's sha256 (never the ONNX graph's)."""
        return self._info

    def _close_impl(self) -> None:
        # The context goes before the buffers it points into; the engine with its last session.
        del self._context
        del self._engine
        self._cache.release(self._shared)
        del self._shared
        self._cuda.close()


class TensorRTBackend:
    """Sessions on the bundle's engine for this GPU, TensorRT and precision (default: the bundle's)."""

    name = "tensorrt"
    # Triton's default: one instance per GPU; more instances are more contexts and streams.
    default_instances = 1

    def __init__(self, *, precision: str | None = None, device: int = 0, cuda_graph: bool = False) -> None:
        _require_tensorrt()
        self.precision = precision
        self.device = device
        self.cuda_graph = cuda_graph
        self.engines = EngineCache()

    def load(self, bundle: Bundle) -> TensorRTSession:
        # The bundle's own precision unless asked otherwise: never a silent change.
        precision = self.precision or PRECISION_NAMES.get(bundle.manifest.precision, "fp32")
        try:
            plan = select_engine(bundle.path, device_facts(self.device), precision)
        except BundleError as exc:
            # No engine fits this GPU: the device cannot run the bundle, the bundle itself is sound.
            raise BackendError(str(exc)) from exc
        if plan is None:
            raise BackendError(f"{bundle.path}: no {precision} engine for this device")
        entry = read_sidecar(plan.with_suffix(".json"))
        # The plan's bytes as checked against the manifest's sha256, not the file read again later.
        data = bundle.read_file(plan.relative_to(bundle.path).as_posix())
        return TensorRTSession(
            bundle.manifest, data, entry, device=self.device, cuda_graph=self.cuda_graph, engines=self.engines
        )


def tensorrt_info(entry: manifest_pb2.EngineEntry, plan_sha256: str, device: int) -> manifest_pb2.RunnerInfo:
    int8 = entry.precision == manifest_pb2.PRECISION_INT8
    return manifest_pb2.RunnerInfo(
        kind="tensorrt",
        version=entry.tensorrt_version,
        device=f"cuda:{device}",
        precision=entry.precision,
        quant_execution=manifest_pb2.QUANT_EXECUTION_INTEGER if int8 else manifest_pb2.QUANT_EXECUTION_NONE,
        detail=entry.plan,
        artifact_sha256=plan_sha256,
    )
