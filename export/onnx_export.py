"""torch.nn.Module -> ONNX with a dynamic batch dimension, checked by onnx."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgescope.errors import ExportError

if TYPE_CHECKING:
    import torch

DEFAULT_OPSET = 18


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export with ``torch.export`` (dynamo) and a symbolic batch axis named ``batch``."""
    import torch

    # torch.export cannot trace a ScriptModule; those take the TorchScript-based exporter.
    scripted = isinstance(model, torch.jit.ScriptModule)
    dynamic: dict[str, Any] = (
        {"dynamic_axes": {input_name: {0: "batch"}, output_name: {0: "batch"}}}
        if scripted
        else {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=64)},)}
    )
    # The exporter narrates its steps on stdout and trips deprecations inside
    # torch itself; neither is the user's to act on.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # ScriptModules have no Python signature; the exporter says so and copes.
        warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                external_data=False,
                dynamo=not scripted,
                **dynamic,
            )
        except Exception as exc:  # the exporter raises many types; name the cause
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return proto
