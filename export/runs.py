"""Run a model over representative frames exactly as the runtime feeds a stream.

Recurrent state and the previous frame are carried from frame to frame by
the runtime's own ``ModelState``, so the gate measures what a stream sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgescope.errors import ExportError
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.pipeline.state import ModelState
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

Frames = Sequence[npt.NDArray[np.float32]]


def run_stream(
    run: Callable[[Feed], Outputs], manifest: manifest_pb2.ModelManifest, frames: Frames
) -> tuple[list[Feed], list[Outputs]]:
    """Feeds and outputs of every frame, in order, as one stream."""
    state = ModelState(manifest)
    feeds: list[Feed] = []
    outputs: list[Outputs] = []
    for frame in frames:
        feed = state.feed(frame)
        result = run(feed)
        state.update(frame, result)
        feeds.append(feed)
        outputs.append(result)
    return feeds, outputs


def example_inputs(manifest: manifest_pb2.ModelManifest, frame: npt.NDArray[np.float32]) -> tuple[torch.Tensor, ...]:
    """The first frame's feed as torch tensors in the graph's input order (for tracing)."""
    import torch

    feed = ModelState(manifest).feed(frame)
    return tuple(torch.from_numpy(np.asarray(feed[spec.name])) for spec in manifest.inputs)


def torch_runner(model: torch.nn.Module, manifest: manifest_pb2.ModelManifest) -> Callable[[Feed], Outputs]:
    import torch

    names = [spec.name for spec in manifest.outputs]

    def run(feed: Feed) -> Outputs:
        with torch.inference_mode():
            result = model(*(torch.from_numpy(np.asarray(feed[spec.name])) for spec in manifest.inputs))
        values = result if isinstance(result, tuple | list) else (result,)
        if len(values) != len(names):
            raise ExportError(f"the model returned {len(values)} tensors; the manifest expects {', '.join(names)}")
        return {name: value.numpy() for name, value in zip(names, values, strict=True)}

    return run


def onnx_runner(session: ort.InferenceSession) -> Callable[[Feed], Outputs]:
    names = [o.name for o in session.get_outputs()]

    def run(feed: Feed) -> Outputs:
        return dict(zip(names, session.run(names, dict(feed)), strict=True))

    return run


def check_batch(session: ort.InferenceSession, feeds: Sequence[Feed], outputs: Sequence[Outputs], atol: float) -> None:
    """The batch axis is dynamic: two frames in one batch must answer as they do one by one."""
    if len(feeds) < 2:
        return
    batch = {name: np.concatenate([feeds[0][name], feeds[1][name]]) for name in feeds[0]}
    batched = onnx_runner(session)(batch)
    for name, value in batched.items():
        single = np.concatenate([outputs[0][name], outputs[1][name]])
        if value.shape != single.shape or not np.allclose(value, single, atol=atol):
            raise ExportError(f"the ONNX model gives different {name!r} in a batch than frame by frame")
