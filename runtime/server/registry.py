"""The models a server serves: name -> model (bundle, worker, provenance).

Frames take a model with ``lease`` and give it back with ``release``. A model
replaced or unloaded while leased is retired: it takes no new leases, and its
worker is stopped when the last lease is returned. Stopping lets queued and
running jobs finish before each session is closed on its own thread, so a
reload never fails a frame and never closes a session under a running call.
Models are keyed by identity, never by ``id()``.

Loading (reading, checking, warming up) is blocking: call ``load`` from the
server's loader thread, never the event loop or the frame threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgescope.bundle import Bundle, load_bundle
from edgescope.errors import BundleError, ConfigError, ModelNotFoundError
from edgescope.runtime.backends.base import Backend, Session, SessionCapabilities
from edgescope.runtime.pipeline.state import ModelState, is_stateful
from edgescope.runtime.server.workers import ModelWorker
from edgescope.v1 import manifest_pb2, stream_pb2

# Bounds the echo of a client-supplied name in error messages.
_NAME_ECHO = 128


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How each model's worker runs: instances, and batching for the models that allow it."""

    instances: int = 1
    max_batch: int = 8
    batch_delay_s: float = 0.0


@dataclass(frozen=True, slots=True, eq=False)
class ServedModel:
    """One loaded version of a model. Hashed by identity: a reload is a different object."""

    name: str
    bundle: Bundle
    worker: ModelWorker
    provenance: stream_pb2.Provenance

    @property
    def manifest(self) -> manifest_pb2.ModelManifest:
        return self.bundle.manifest

    @property
    def capabilities(self) -> SessionCapabilities:
        if self.worker.capabilities is None:
            raise BundleError(f"model {self.name} has no running session")
        return self.worker.capabilities

    @property
    def batchable(self) -> bool:
        """Frames of different streams may share one inference."""
        return self.capabilities.dynamic_batch and not is_stateful(self.manifest)


def warm_up(session: Session, manifest: manifest_pb2.ModelManifest) -> None:
    """Run one zero frame: the first run allocates and picks kernels; pay that before serving."""
    pre = manifest.preprocessing
    channels = 1 if pre.color == manifest_pb2.COLOR_MODE_GRAY else 3
    shape = (
        (1, pre.height, pre.width, channels)
        if pre.layout == manifest_pb2.LAYOUT_NHWC
        else (1, channels, pre.height, pre.width)
    )
    # Stateful models also take their initial state (and a previous frame).
    session.infer(ModelState(manifest).feed(np.zeros(shape, dtype=np.float32)))


def _echo(name: str) -> str:
    return name if len(name) <= _NAME_ECHO else name[:_NAME_ECHO] + "..."


class ModelRegistry:
    """Name -> served model; thread-safe. Owns every worker it started until ``close``."""

    def __init__(self, options: WorkerOptions | None = None) -> None:
        self.options = options or WorkerOptions()
        self._models: dict[str, ServedModel] = {}
        self._leases: dict[ServedModel, int] = {}
        self._retired: set[ServedModel] = set()
        # Workers told to stop, kept so close() can wait for them.
        self._stopping: list[ModelWorker] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[list[str]], None]] = []

    def on_change(self, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener(names)`` whenever the set of served names changes (telemetry's label set)."""
        self._listeners.append(listener)
        listener(self.names())

    def load(
        self,
        path: Path,
        backend: Backend,
        *,
        name: str | None = None,
        warm: bool = True,
        allow_failed_validation: bool = False,
        replace: bool = False,
    ) -> ServedModel:
        """Load, warm up and start a bundle's worker, then publish it (replacing a same-named model if asked)."""
        bundle = load_bundle(path)
        if not bundle.manifest.validation.passed and not allow_failed_validation:
            # A forced export is kept for investigation, not for patients.
            raise BundleError(
                f"{path}: this bundle failed its accuracy gate at export; serving it needs "
                "the server's --allow-failed-validation"
            )
        model_name = name or bundle.manifest.name
        if not replace:
            with self._lock:
                if model_name in self._models:
                    raise ConfigError(f"a model named {_echo(model_name)!r} is already loaded")
        manifest = bundle.manifest

        def check(session: Session) -> None:
            if warm:
                warm_up(session, manifest)

        worker = ModelWorker(
            model_name,
            lambda: backend.load(bundle),
            instances=self.options.instances,
            max_batch=self.options.max_batch,
            batch_delay_s=self.options.batch_delay_s,
            check=check,
        )
        worker.start()
        assert worker.capabilities is not None  # start() sets it or raises
        provenance = stream_pb2.Provenance(
            model=model_name,
            version=manifest.version,
            sha256=bundle.onnx_sha256,
            backend=backend.name,
            precision=manifest.precision,
            device=worker.capabilities.device,
        )
        model = ServedModel(model_name, bundle, worker, provenance)
        with self._lock:
            old = self._models.get(model_name)
            if old is not None and not replace:
                worker.retire()
                raise ConfigError(f"a model named {_echo(model_name)!r} is already loaded")
            self._models[model_name] = model
            if old is not None:
                self._retire(old)
        self._notify()
        return model

    def unload(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            if model is None:
                raise ModelNotFoundError(f"model {_echo(name)!r} is not loaded")
            self._retire(model)
        self._notify()

    def _retire(self, model: ServedModel) -> None:
        """Stop the model taking leases; its worker stops now if unleased, else with its last lease."""
        if self._leases.get(model, 0) == 0:
            self._stop(model.worker)
        else:
            self._retired.add(model)

    def lease(self, name: str) -> ServedModel:
        """The current model of that name; its worker keeps running until ``release``."""
        with self._lock:
            model = self._lookup(name)
            self._leases[model] = self._leases.get(model, 0) + 1
            return model

    def release(self, model: ServedModel) -> None:
        with self._lock:
            left = self._leases[model] - 1
            if left:
                self._leases[model] = left
                return
            del self._leases[model]
            if model not in self._retired:
                return
            self._retired.discard(model)
            self._stop(model.worker)

    def _stop(self, worker: ModelWorker) -> None:
        worker.retire()
        self._stopping = [w for w in self._stopping if not w.join(0)]  # forget the ones already gone
        self._stopping.append(worker)

    def get(self, name: str) -> ServedModel:
        with self._lock:
            return self._lookup(name)

    def _lookup(self, name: str) -> ServedModel:
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise ModelNotFoundError(
                f"the frame names no model and {len(self._models)} are loaded; "
                f"set Frame.model to one of: {', '.join(sorted(self._models)) or '(none)'}"
            )
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"model {_echo(name)!r} is not loaded; loaded models: {', '.join(sorted(self._models)) or '(none)'}"
            )
        return model

    def all(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def _notify(self) -> None:
        names = self.names()
        for listener in self._listeners:
            listener(names)

    def close(self, timeout_s: float = 30.0) -> None:
        """Retire every model (leased or not), then wait for their workers to finish and close."""
        with self._lock:
            workers = [m.worker for m in (*self._models.values(), *self._retired, *self._leases)] + self._stopping
            self._models, self._retired, self._leases, self._stopping = {}, set(), {}, []
        for worker in workers:
            worker.retire()
        for worker in workers:
            worker.join(timeout_s)
