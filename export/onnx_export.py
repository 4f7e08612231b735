"""torch.nn.Module -> ONNX with a dynamic (or, asked for, fixed) batch dimension, checked by onnx."""

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
from edgescope.export.failures import explain

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
BATCH = "batch"


@contextlib.contextmanager
def _quiet_exporter_log() -> Iterator[None]:
    """Keep torch's exporters from logging to the user's terminal.

    They log optional-package notices (torchvision ops they skip) at WARNING and,
    before raising, their own traceback at ERROR; the raised exception carries
    that report, which ``--debug`` prints.
    """
    names = ("torch.onnx", "torch._dynamo", "torch._guards", "torch._export", "torch.export", "torch.fx")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _batch_dims(proto: onnx.ModelProto) -> dict[str, str | int]:
    """Each graph input's and output's first dimension: its symbol, or its size when fixed."""
    dims: dict[str, str | int] = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        shape = value.type.tensor_type.shape.dim
        if shape:
            dims[value.name] = shape[0].dim_param or shape[0].dim_value
    return dims


def _check_batch_of_two(model: torch.nn.Module, examples: tuple[torch.Tensor, ...]) -> None:
    """The model must run on the example batch it is traced with (two frames); if it runs on one only, say so."""
    import torch

    try:
        with torch.no_grad():
            model(*examples)
    except Exception as exc:  # the user's code may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ExportError(
            f"the model runs on one frame but fails on a batch of {len(examples[0])} "
            f"({type(exc).__name__}: {first}): its code "
            "fixes the batch size; make it batch-agnostic, or export with --static-batch "
            "(one frame per inference, no batching across streams)"
        ) from exc


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_name: str | Sequence[str],
    output_name: str | Sequence[str],
    opset: int = DEFAULT_OPSET,
    static_batch: bool = False,
) -> onnx.ModelProto:
    """Export with ``torch.export`` (dynamo) and a symbolic batch axis named ``batch``.

    Models with several inputs or outputs (state tensors, detection heads)
    take a tuple of examples and a name per input and output; every one
    shares the batch axis. ``static_batch`` keeps the example's batch size
    fixed instead (for models whose code cannot take another). A failure
    inside torch becomes an ExportError whose message says what to do.
    """
    import torch

    examples = example if isinstance(example, tuple) else (example,)
    inputs = [input_name] if isinstance(input_name, str) else list(input_name)
    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    # torch.export cannot trace a ScriptModule, even wrapped (output selection, a task's
    # wrapper); those take the TorchScript-based exporter.
    scripted = any(isinstance(module, torch.jit.ScriptModule) for module in model.modules())
    dynamic: dict[str, Any] = {}
    if not static_batch:
        batch = torch.export.Dim(BATCH, min=1, max=64)
        dynamic = (
            {"dynamic_axes": {name: {0: BATCH} for name in [*inputs, *outputs]}}
            if scripted
            else {"dynamic_shapes": tuple({0: batch} for _ in examples)}
        )
        _check_batch_of_two(model, examples)
    # The exporter narrates its steps on stdout, prints partial graphs on stderr when it
    # fails, and trips deprecations inside torch itself; none is the user's to act on
    # (the partial graph is kept for -v).
    narration = io.StringIO()
    with (
        contextlib.redirect_stdout(narration),
        contextlib.redirect_stderr(narration),
        warnings.catch_warnings(),
        _quiet_exporter_log(),
    ):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # ScriptModules have no Python signature; the exporter says so and copes.
        warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
        # Every input shares the one batch axis on purpose; the exporter remarks on it.
        warnings.filterwarnings("ignore", message=".*The axis name: batch will not be used", category=UserWarning)
        # InstanceNorm without running statistics always normalises by the input's own, which the
        # TorchScript-based exporter calls train=True (MONAI's SwinUNETR); the gate checks the result.
        warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True", category=UserWarning)
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
        except Exception as exc:  # the exporter raises many types; name the cause and what to do
            _log.debug("torch.onnx.export printed:\n%s", narration.getvalue())
            raise ExportError(explain(exc, static_batch=static_batch, opset=opset)) from exc
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    if static_batch:
        other = {name: dim for name, dim in _batch_dims(proto).items() if dim != 1}
        if other:
            name, dim = next(iter(other.items()))
            raise ExportError(
                f"with --static-batch the graph takes one frame, but {name!r} leads with {dim}: "
                "export the model (or its torch.export program) with a batch of one"
            )
    else:
        fixed = {name: dim for name, dim in _batch_dims(proto).items() if isinstance(dim, int)}
        if fixed:
            name, size = next(iter(fixed.items()))
            raise ExportError(
                f"the exporter fixed the batch axis of {name!r} at {size}: the model's code depends on the batch "
                "size (a reshape or a branch on it); make it batch-agnostic, or export with --static-batch "
                "(one frame per inference, no batching across streams)"
            )
    return proto
