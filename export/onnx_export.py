"""torch.nn.Module -> ONNX with a dynamic batch dimension, checked by onnx."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgescope.errors import ExportError

if TYPE_CHECKING:
    import torch

DEFAULT_OPSET = 18


@contextlib.contextmanager
def _quiet_exporter_log() -> Iterator[None]:
    """The exporter logs optional-package notices (e.g. torchvision ops it skips) at WARNING."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter_log.setLevel(level)


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_name: str | Sequence[str],
    output_name: str | Sequence[str],
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export with ``torch.export`` (dynamo) and a symbolic batch axis named ``batch``.

    Models with several inputs or outputs (state tensors, detection heads)
    take a tuple of examples and a name per input and output; every one
    shares the batch axis.
    """
    import torch

    examples = example if isinstance(example, tuple) else (example,)
    inputs = [input_name] if isinstance(input_name, str) else list(input_name)
    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    # torch.export cannot trace a ScriptModule; those take the TorchScript-based exporter.
    scripted = isinstance(model, torch.jit.ScriptModule)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic: dict[str, Any] = (
        {"dynamic_axes": {name: {0: "batch"} for name in [*inputs, *outputs]}}
        if scripted
        else {"dynamic_shapes": tuple({0: batch} for _ in examples)}
    )
    # The exporter narrates its steps on stdout and trips deprecations inside
    # torch itself; neither is the user's to act on.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_exporter_log():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # ScriptModules have no Python signature; the exporter says so and copes.
        warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
        # Every input shares the one batch axis on purpose; the exporter remarks on it.
        warnings.filterwarnings("ignore", message=".*The axis name: batch will not be used", category=UserWarning)
        try:
            torch.onnx.export(
                model,
                examples,
                str(path),
                input_names=inputs,
                output_names=outputs,
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
