"""What a model is fed besides the frame: recurrent state, the previous frame, other sources.

A model whose manifest declares ``state`` tensors, or an input fed with the
previous frame (``INPUT_ROLE_PREVIOUS_FRAME``), needs the stream's history.
A model fed by several sources (``INPUT_ROLE_SOURCE``) takes, with each
frame, the frames of the other sources paired with it (``source_inputs``).
Each stream keeps one ``ModelState`` per model: initialised on the stream's
first frame, restarted by ``Frame.reset_state``, freed when the stream ends.

::

    states = StreamStates()                          # one per server
    stream = states.for_stream(key)                  # on the stream's first frame
    run_model(model, frame, queued_ns, stream)       # carries and updates it
    states.drop(key)                                 # when the stream ends

Frames of one stream must reach a stateful model in order and one at a
time; ``ModelState.lock`` is held from building the feed to keeping the new
state, so concurrent frames of a stream cannot interleave.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError, BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.v1 import manifest_pb2

Tensor = npt.NDArray[np.float32]

_STATE_DTYPES: dict[int, type[np.floating]] = {
    manifest_pb2.DATA_TYPE_UNSPECIFIED: np.float32,
    manifest_pb2.DATA_TYPE_FLOAT32: np.float32,
    manifest_pb2.DATA_TYPE_FLOAT16: np.float16,
}


def frame_input(manifest: manifest_pb2.ModelManifest) -> str:
    """The input fed with the preprocessed frame."""
    for binding in manifest.input_bindings:
        if binding.role == manifest_pb2.INPUT_ROLE_FRAME:
            return binding.input
    if not manifest.inputs:
        raise BundleError(f"the manifest of {manifest.name} declares no inputs")
    return manifest.inputs[0].name


def frame_source(manifest: manifest_pb2.ModelManifest) -> str:
    """The name of the source whose frames feed the frame input; empty for a model of one source."""
    return next((b.source for b in manifest.input_bindings if b.role == manifest_pb2.INPUT_ROLE_FRAME), "")


def source_inputs(manifest: manifest_pb2.ModelManifest) -> list[manifest_pb2.InputBinding]:
    """The inputs fed by other sources than the frame's, each with its source and preprocessing."""
    return [b for b in manifest.input_bindings if b.role == manifest_pb2.INPUT_ROLE_SOURCE]


def previous_frame_inputs(manifest: manifest_pb2.ModelManifest) -> list[str]:
    return [b.input for b in manifest.input_bindings if b.role == manifest_pb2.INPUT_ROLE_PREVIOUS_FRAME]


def is_stateful(manifest: manifest_pb2.ModelManifest) -> bool:
    """True when a model's answer depends on the stream's earlier frames."""
    return bool(manifest.state) or bool(previous_frame_inputs(manifest))


def _initial(spec: manifest_pb2.StateTensor) -> npt.NDArray[np.floating]:
    dtype = _STATE_DTYPES.get(spec.dtype)
    if dtype is None:
        raise BundleError(f"state tensor {spec.input}: dtype {manifest_pb2.DataType.Name(spec.dtype)} is not supported")
    return np.full((1, *spec.shape), spec.initial_value, dtype=dtype)


class ModelState:
    """One stream's state for one model."""

    def __init__(self, manifest: manifest_pb2.ModelManifest) -> None:
        self.manifest = manifest
        self.lock = threading.Lock()
        self._frame_input = frame_input(manifest)
        self._previous_inputs = previous_frame_inputs(manifest)
        self._state: dict[str, npt.NDArray[np.floating]] = {}
        self._previous: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self._state = {spec.input: _initial(spec) for spec in self.manifest.state}
        self._previous = None

    def feed(self, tensor: Tensor, sources: Mapping[str, Tensor] | None = None) -> dict[str, npt.NDArray[np.generic]]:
        """Every input of the model for this frame (a batch of one); ``sources``: the other sources' inputs."""
        feed: dict[str, npt.NDArray[np.generic]] = {self._frame_input: tensor}
        if sources:
            feed.update(sources)
        # A stream's first frame has no predecessor: it is its own, so motion reads zero.
        previous = tensor if self._previous is None else self._previous
        for name in self._previous_inputs:
            feed[name] = previous
        feed.update(self._state)
        return feed

    def update(self, tensor: Tensor, outputs: Outputs) -> None:
        """Keep the new state from this frame's outputs, and the frame for the next one."""
        for spec in self.manifest.state:
            value = outputs.get(spec.output)
            if value is None:
                raise BackendError(f"the model did not produce its state output {spec.output!r}")
            self._state[spec.input] = np.asarray(value, dtype=self._state[spec.input].dtype)
        if self._previous_inputs:
            self._previous = tensor


class StreamState:
    """One stream's ``ModelState`` per model name."""

    def __init__(self) -> None:
        self._models: dict[str, ModelState] = {}
        self._lock = threading.Lock()

    def for_model(self, name: str, manifest: manifest_pb2.ModelManifest) -> ModelState:
        """The stream's state for a model; started afresh if the model was reloaded with another manifest."""
        with self._lock:
            state = self._models.get(name)
            if state is None or state.manifest is not manifest:
                state = self._models[name] = ModelState(manifest)
            return state

    def reset(self) -> None:
        with self._lock:
            self._models.clear()


class StreamStates:
    """Stream key -> ``StreamState``; thread-safe. Key by something unique per live stream."""

    def __init__(self) -> None:
        self._streams: dict[str, StreamState] = {}
        self._lock = threading.Lock()

    def for_stream(self, key: str) -> StreamState:
        with self._lock:
            state = self._streams.get(key)
            if state is None:
                state = self._streams[key] = StreamState()
            return state

    def drop(self, key: str) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)
