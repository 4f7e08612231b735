"""The PyTorch side of the gate: the original model as a runner, and the traced example.

Frames run as one stream (``edgescope.runtime.evaluation.run_stream``):
recurrent state and the previous frame carry over exactly as the runtime
carries them, so the gate measures what a stream sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgescope.errors import ExportError
from edgescope.runtime.backends.base import Feed, Outputs, dynamic_batch
from edgescope.runtime.evaluation.runners import Infer, Runner
from edgescope.runtime.pipeline.state import ModelState
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import torch

Log = Callable[[str], None]

# torch.inference_mode() refuses some models that run under no_grad(): a TorchScript module
# after the TorchScript-based ONNX exporter has run its passes on it (a traced SwinUNETR)
# raises "Inference tensors cannot be saved for backward"; in-place updates of inference
# tensors fail alike. Every such message names inference tensors.
_INFERENCE_MODE_FAILURE = "inference tensor"


def example_inputs(
    manifest: manifest_pb2.ModelManifest,
    frame: npt.NDArray[np.float32],
    batch: int | None = None,
    sources: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The first frame's feed as torch tensors in the graph's input order, ``batch`` copies of it.

    For tracing (``batch`` None) a dynamic batch axis gets two copies: torch.export
    specialises a dimension of size 1, and a model traced on one frame can come
    out with its batch fixed (or not export at all, as MONAI's SwinUNETR does).
    """
    import torch

    feed = ModelState(manifest).feed(frame, sources)
    copies = batch or (2 if dynamic_batch(manifest) else 1)
    return tuple(torch.from_numpy(np.concatenate([feed[spec.name]] * copies)) for spec in manifest.inputs)


def torch_runner(
    model: torch.nn.Module,
    manifest: manifest_pb2.ModelManifest,
    source_sha256: str = "",
    log: Log = print,
) -> Runner:
    """The PyTorch model on the CPU, in FP32: the reference every export is held to.

    It runs under ``torch.inference_mode()``; where that fails on inference
    tensors (see ``_INFERENCE_MODE_FAILURE``) the frame is run again under
    ``torch.no_grad()``, which computes the same values, and every later frame
    too. The log and the runner's description say so.
    """
    import torch

    names = [spec.name for spec in manifest.outputs]
    info = manifest_pb2.RunnerInfo(
        kind="pytorch",
        version=torch.__version__,
        device="cpu",
        precision=manifest_pb2.PRECISION_FP32,
        detail=type(model).__name__,
        artifact_sha256=source_sha256,
    )
    grad_modes = [torch.inference_mode, torch.no_grad]

    def forward(inputs: list[torch.Tensor]) -> object:
        try:
            with grad_modes[0]():
                return model(*inputs)
        except RuntimeError as exc:
            if len(grad_modes) == 1 or _INFERENCE_MODE_FAILURE not in str(exc).lower():
                raise
            grad_modes.pop(0)
            reason = next((line.strip() for line in str(exc).splitlines() if "nference" in line), str(exc))
            log(f"  PyTorch runs under torch.no_grad(): torch.inference_mode() failed on this model ({reason[:120]})")
            info.detail = f"{type(model).__name__}, under torch.no_grad"
        with grad_modes[0]():
            return model(*inputs)

    def infer(feed: Feed) -> Outputs:
        inputs = [torch.from_numpy(np.asarray(feed[spec.name])) for spec in manifest.inputs]
        try:
            result = forward(inputs)
        except Exception as exc:  # the user's model may raise anything; the first line must say so
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ExportError(
                f"the PyTorch model failed on a gate frame ({type(exc).__name__}: {first}); --debug shows the traceback"
            ) from exc
        values = result if isinstance(result, tuple | list) else (result,)
        if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
            raise ExportError(f"the model returned {len(values)} values; the manifest expects {', '.join(names)}")
        return {name: value.numpy() for name, value in zip(names, values, strict=True)}

    return Runner(infer, info)


def check_batch(infer: Infer, feeds: Sequence[Feed], outputs: Sequence[Outputs], atol: float, rtol: float) -> None:
    """The batch axis is dynamic: two frames in one batch must answer as they do one by one."""
    if len(feeds) < 2:
        return
    hint = (
        "its batch axis is not truly dynamic (a traced model, or code that fixes the batch size): "
        "make the model batch-agnostic, or export with --static-batch"
    )
    batch = {name: np.concatenate([feeds[0][name], feeds[1][name]]) for name in feeds[0]}
    try:
        answers = infer(batch)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ExportError(f"the ONNX model fails on a batch of two frames, {hint} ({first})") from exc
    for name, value in answers.items():
        single = np.concatenate([outputs[0][name], outputs[1][name]])
        if value.shape != single.shape or not np.allclose(value, single, rtol=rtol, atol=atol):
            raise ExportError(f"the ONNX model gives different {name!r} in a batch than frame by frame: {hint}")
