"""The models a server has loaded, each with its session and provenance."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError, ModelNotFoundError
from edgescope.runtime.backends.base import Backend, Session
from edgescope.runtime.pipeline.state import ModelState
from edgescope.runtime.server.repository import BundlePolicy
from edgescope.runtime.server.status import echo
from edgescope.v1 import manifest_pb2, stream_pb2


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    bundle: Bundle
    session: Session
    provenance: stream_pb2.Provenance

    @property
    def manifest(self) -> manifest_pb2.ModelManifest:
        return self.bundle.manifest


def _warm_up(session: Session, manifest: manifest_pb2.ModelManifest) -> None:
    # The first run allocates and picks kernels; pay that before reporting ready.
    pre = manifest.preprocessing
    channels = 1 if pre.color == manifest_pb2.COLOR_MODE_GRAY else 3
    shape = (
        (1, pre.height, pre.width, channels)
        if pre.layout == manifest_pb2.LAYOUT_NHWC
        else (1, channels, pre.height, pre.width)
    )
    # Stateful models also take their initial state (and a previous frame).
    session.infer(ModelState(manifest).feed(np.zeros(shape, dtype=np.float32)))


class ModelRegistry:
    """Name -> loaded model; thread-safe, closes the sessions it owns.

    Frames take a model with ``acquire`` and give it back with ``release``. A
    model replaced or unloaded while frames use it is retired: it stays open
    until its last frame is released, so a reload never fails a frame.
    """

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._in_use: dict[int, int] = {}
        self._retired: dict[int, LoadedModel] = {}
        self._lock = threading.Lock()

    def load(
        self,
        path: Path,
        backend: Backend,
        *,
        name: str | None = None,
        warm_up: bool = True,
        policy: BundlePolicy | None = None,
        replace: bool = False,
    ) -> LoadedModel:
        """Load and warm up a bundle, then publish it (replacing a same-named model if asked)."""
        bundle = (policy or BundlePolicy()).open(path)
        model_name = name or bundle.manifest.name
        session = backend.load(bundle)
        if warm_up:
            _warm_up(session, bundle.manifest)
        provenance = stream_pb2.Provenance(
            model=model_name,
            version=bundle.manifest.version,
            sha256=bundle.onnx_sha256,
            backend=backend.name,
            precision=bundle.manifest.precision,
            device=session.capabilities.device,
            failed_validation=not bundle.manifest.validation.passed,
            signer=bundle.signer,
        )
        model = LoadedModel(model_name, bundle, session, provenance)
        with self._lock:
            old = self._models.get(model_name)
            if old is not None and not replace:
                session.close()
                raise ConfigError(f"a model named {model_name!r} is already loaded")
            self._models[model_name] = model
            to_close = self._retire(old) if old is not None else None
        if to_close is not None:
            to_close.session.close()
        return model

    def unload(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            if model is None:
                raise ModelNotFoundError(f"model {echo(name)} is not loaded")
            to_close = self._retire(model)
        if to_close is not None:
            to_close.session.close()

    def _retire(self, model: LoadedModel) -> LoadedModel | None:
        """Mark a model retired; return it if nothing uses it, so the caller closes it."""
        if self._in_use.get(id(model), 0) == 0:
            return model
        self._retired[id(model)] = model
        return None

    def acquire(self, name: str) -> LoadedModel:
        """The current model of that name, held open until ``release``."""
        with self._lock:
            model = self._lookup(name)
            self._in_use[id(model)] = self._in_use.get(id(model), 0) + 1
            return model

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            left = self._in_use[id(model)] - 1
            if left:
                self._in_use[id(model)] = left
                return
            del self._in_use[id(model)]
            retired = self._retired.pop(id(model), None)
        if retired is not None:
            retired.session.close()

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            return self._lookup(name)

    def _lookup(self, name: str) -> LoadedModel:
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
                f"model {echo(name)} is not loaded; loaded models: {', '.join(sorted(self._models)) or '(none)'}"
            )
        return model

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def close(self) -> None:
        with self._lock:
            models = [*self._models.values(), *self._retired.values()]
            self._models, self._retired = {}, {}
        for model in models:
            model.session.close()
