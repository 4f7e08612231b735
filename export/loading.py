"""Load the user's trained model: factory + weights, TorchScript, or a torch.export program."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from edgescope.errors import ExportError, MissingDependencyError

if TYPE_CHECKING:
    import torch


def import_torch() -> object:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("PyTorch", "export needs torch: pip install 'edgescope[export]'") from exc
    return torch


def _resolve_factory(spec: str) -> object:
    """``package.module:attr`` or ``path/to/file.py:attr`` -> the attribute."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ExportError(f"factory {spec!r} must look like 'package.module:build' or 'path/model.py:build'")
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ExportError(f"factory file {path} does not exist")
        module_name = f"_edgescope_user_model_{path.stem}"
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise ExportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        spec_obj.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise ExportError(f"cannot import {module_part!r} for factory {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ExportError(f"{module_part} has no attribute {attr!r}") from exc


def _load_exported_program(path: Path, static_batch: bool) -> torch.nn.Module:
    """A ``.pt2`` saved by ``torch.export.save``; its batch axis must have been exported dynamic,
    unless the bundle's batch is fixed too."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many kinds for corrupt or foreign files
        raise ExportError(f"{path} is not a loadable torch.export program (.pt2): {exc}") from exc
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    for node in placeholders:
        value = node.meta.get("val")
        fixed = isinstance(value, torch.Tensor) and value.ndim > 0 and not isinstance(value.shape[0], torch.SymInt)
        if node.name in user_inputs and fixed and not static_batch:
            raise ExportError(
                f"{path} was exported with a fixed batch size for input {node.name!r}: "
                "re-export it with dynamic_shapes giving dim 0 a torch.export.Dim('batch') "
                "and an example batch of 2 or more, or pass --static-batch"
            )
    module = program.module()
    # The program's graph was fixed (eval or not) when the user exported it, and its module
    # refuses eval(); clearing the flag only stops the ONNX exporter warning about it.
    for submodule in module.modules():
        submodule.training = False
    return module


def load_model(
    factory: str | None,
    weights: Path | None,
    torchscript: Path | None,
    exported_program: Path | None = None,
    static_batch: bool = False,
) -> torch.nn.Module:
    """Return the model in eval mode; weights are loaded with ``weights_only=True``."""
    import_torch()
    import torch

    given = [
        what for what, v in (("a factory", factory), ("TorchScript", torchscript), ("a .pt2", exported_program)) if v
    ]
    if len(given) > 1:
        raise ExportError(f"give one model source, not {' and '.join(given)}")
    if exported_program is not None:
        if weights is not None:
            raise ExportError("a torch.export program carries its weights; drop --weights")
        return _load_exported_program(exported_program, static_batch)
    if torchscript is not None:
        if weights is not None:
            raise ExportError("give either a TorchScript file or a factory with weights, not both")
        try:
            with warnings.catch_warnings():
                # torch deprecates TorchScript; the user chose it, so the warning is noise here.
                warnings.simplefilter("ignore", DeprecationWarning)
                module: torch.jit.ScriptModule = torch.jit.load(str(torchscript), map_location="cpu")  # type: ignore[no-untyped-call]
        except (RuntimeError, ValueError, OSError) as exc:
            raise ExportError(f"{torchscript} is not a loadable TorchScript file: {exc}") from exc
        return module.eval()
    if factory is None:
        raise ExportError("a model needs --factory (with --weights), --torchscript or --exported-program")
    build = _resolve_factory(factory)
    if not callable(build):
        raise ExportError(f"factory {factory!r} is not callable")
    model = build()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for corrupt or unsafe files
            raise ExportError(f"cannot load weights {weights}: {exc}") from exc
        if not isinstance(state, dict):
            raise ExportError(f"{weights} does not hold a state_dict (found {type(state).__name__})")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ExportError(f"weights {weights} do not fit the model from {factory}: {exc}") from exc
    return model.eval()
