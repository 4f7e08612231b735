"""The PyTorch side of the gate: the original model as a runner, and the traced example.

Frames run as one stream (``edgescope.runtime.evaluation.run_stream``):
recurrent state and the previous frame carry over exactly as the runtime
carries them, so the gate measures what a stream sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgescope.errors import ExportError
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.evaluation.runners import Infer, Runner
from edgescope.runtime.pipeline.state import ModelState
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import torch


def example_inputs(manifest: manifest_pb2.ModelManifest, frame: npt.NDArray[np.float32]) -> tuple[torch.Tensor, ...]:
    """The first frame's feed as torch tensors in the graph's input order (for tracing)."""
    import torch

    feed = ModelState(manifest).feed(frame)
    return tuple(torch.from_numpy(np.asarray(feed[spec.name])) for spec in manifest.inputs)


def torch_runner(model: torch.nn.Module, manifest: manifest_pb2.ModelManifest, source_sha256: str = "") -> Runner:
    """The PyTorch model on the CPU, in FP32: the reference every export is held to."""
    import torch

    names = [spec.name for spec in manifest.outputs]

    def infer(feed: Feed) -> Outputs:
        with torch.inference_mode():
            result = model(*(torch.from_numpy(np.asarray(feed[spec.name])) for spec in manifest.inputs))
        values = result if isinstance(result, tuple | list) else (result,)
        if len(values) != len(names):
            raise ExportError(f"the model returned {len(values)} tensors; the manifest expects {', '.join(names)}")
        return {name: value.numpy() for name, value in zip(names, values, strict=True)}

    info = manifest_pb2.RunnerInfo(
        kind="pytorch",
        version=torch.__version__,
        device="cpu",
        precision=manifest_pb2.PRECISION_FP32,
        detail=type(model).__name__,
        artifact_sha256=source_sha256,
    )
    return Runner(infer, info)


def check_batch(infer: Infer, feeds: Sequence[Feed], outputs: Sequence[Outputs], atol: float) -> None:
    """The batch axis is dynamic: two frames in one batch must answer as they do one by one."""
    if len(feeds) < 2:
        return
    batch = {name: np.concatenate([feeds[0][name], feeds[1][name]]) for name in feeds[0]}
    for name, value in infer(batch).items():
        single = np.concatenate([outputs[0][name], outputs[1][name]])
        if value.shape != single.shape or not np.allclose(value, single, atol=atol):
            raise ExportError(f"the ONNX model gives different {name!r} in a batch than frame by frame")
