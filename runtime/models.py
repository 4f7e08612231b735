"""The models a server has loaded, each with its session and provenance."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgescope.bundle import Bundle, load_bundle
from edgescope.errors import BundleError, ConfigError, ModelNotFoundError
from edgescope.runtime.backends.base import Backend, Session
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
    session.infer({manifest.inputs[0].name: np.zeros(shape, dtype=np.float32)})


class ModelRegistry:
    """Name -> loaded model; thread-safe, closes sessions it owns."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def load(
        self,
        path: Path,
        backend: Backend,
        *,
        name: str | None = None,
        warm_up: bool = True,
        allow_failed_validation: bool = False,
    ) -> LoadedModel:
        bundle = load_bundle(path)
        if not bundle.manifest.validation.passed and not allow_failed_validation:
            # A forced export is kept for investigation, not for patients.
            raise BundleError(
                f"{path}: this bundle failed its accuracy gate at export; serving it needs "
                "an explicit allow_failed_validation (--allow-failed-validation)"
            )
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
        )
        model = LoadedModel(model_name, bundle, session, provenance)
        with self._lock:
            if model_name in self._models:
                session.close()
                raise ConfigError(f"a model named {model_name!r} is already loaded")
            self._models[model_name] = model
        return model

    def get(self, name: str) -> LoadedModel:
        with self._lock:
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
                    f"model {name!r} is not loaded; loaded models: {', '.join(sorted(self._models)) or '(none)'}"
                )
            return model

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for model in models:
            model.session.close()
